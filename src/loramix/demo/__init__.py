"""The embedded default: a protein mini-world with real peptides, four experts and a gate (`loramix demo`)."""

from .run import run_demo, shipped_checkpoint

__all__ = ["run_demo", "shipped_checkpoint"]
