"""`python -m loramix.demo.tasks` prints the folder of the protein lm-eval tasks (lm-eval's `--include_path`)."""

from . import tasks_dir

print(tasks_dir())
