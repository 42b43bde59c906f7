"""Looking at the scalings: collection (tidy table + summary), statistics, figures, two-agent conversations."""

from .collect import ScalingsRecorder, collect_records, token_labels
from .report import analyze
from .stats import ScalingStats, token_entropy

__all__ = ["ScalingStats", "ScalingsRecorder", "analyze", "collect_records", "token_entropy", "token_labels"]
