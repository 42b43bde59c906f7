"""The embedded default: a protein mini-world with real peptides, four experts and a gate (`loramix demo`).

Importing this package registers the world's scorers ("design", "two_segment") with loramix.scoring."""

from . import scoring
from .run import run_demo, shipped_checkpoint

__all__ = ["run_demo", "scoring", "shipped_checkpoint"]
