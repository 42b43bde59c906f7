"""The `loramix` commands, one module per group of commands; cli.py loads a module when its command runs."""
