"""What the model-using commands are told, as dataclasses with a docstring per field (options.py makes them the
options of `generate`, `analyze`, `converse`, `eval` and `serve`): where the model comes from (`LoadConfig`, the
one `--device`), how to sample (`SamplingOptions`) and what to generate (`GenerateConfig`). Each field is checked
here, in `__post_init__`, once. Imports no torch: `loramix --help` reads nothing heavier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .options import check_bounds, cli_metadata

__all__ = ["SEED_MAX", "SEED_MIN", "EvalConfig", "GenerateConfig", "LoadConfig", "SamplingOptions"]

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""A sampling seed's range: what torch.Generator.manual_seed takes (the CLI and the server alike)."""


@dataclass
class LoadConfig:
    """Where a checkpoint's model is loaded, in what precision, on which base."""

    device: str | None = None
    """e.g. cpu, cuda, cuda:1 (default: where the base loads)."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (default: the base's)."""
    base: str | None = None
    """Base model directory to use instead of the one the checkpoint records (checked against it)."""
    quantize: str | None = None
    """Load the base quantized: int8, int4 (torchao) or nf4 (bitsandbytes); none: float. Default: as the checkpoint
    records. Needs loramix[quant]; docs/quantization.md."""

    def __post_init__(self) -> None:
        # base.DTYPES and quant.QUANTIZE_CHOICES hold the names; both import torch, as the load about to follow does
        if self.dtype is not None:
            from .base import DTYPES

            if self.dtype not in DTYPES:
                raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}", field="dtype")
        if self.quantize is not None:
            from .quant import QUANTIZE_CHOICES

            choices = (*QUANTIZE_CHOICES, "none")
            if self.quantize not in choices:
                raise ConfigError(
                    f"unknown quantization {self.quantize!r}; expected one of {', '.join(choices)}", field="quantize"
                )


@dataclass
class SamplingOptions:
    """How tokens are chosen (sampling.SamplingSettings checks the values against each other again per request)."""

    temperature: float = field(default=0.0, metadata=cli_metadata(min=0.0))
    """0 is greedy; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = field(default=0, metadata=cli_metadata(min=0))
    """Sample among the k most likely tokens (0: off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeats."""
    seed: int | None = field(default=None, metadata=cli_metadata(min=SEED_MIN, max=SEED_MAX))
    """Seed for sampling."""

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class GenerateConfig:
    """What `loramix generate` asks of each prompt."""

    mode: str = "granular"
    """Speed mode: granular, prompt or truncated."""
    max_new_tokens: int = field(default=64, metadata=cli_metadata(min=1))
    """Tokens to generate per prompt."""
    stop: list[str] = field(default_factory=list)
    """Stop when this string is generated (it is cut from the answer); repeat for several."""
    batch_size: int = field(default=8, metadata=cli_metadata(min=1))
    """Prompts generated together (left padding)."""
    compile: bool = False
    """Decode with the compiled step (torch.compile over the paged caches; the first batch of each size compiles;
    see docs/generation.md)."""

    def __post_init__(self) -> None:
        check_bounds(self)
        from .decode import MODES  # the one list of modes (imports torch: the command is about to load a model)

        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}", field="mode")
        from .request import check_stops  # the stop list's one check (an empty string would stop at once)

        self.stop = check_stops(self.stop, "stop")


@dataclass
class EvalConfig:
    """Which rows `loramix eval` scores, on how many records, in what batches."""

    systems: list[str] = field(default_factory=list)
    """Rows to run (default: all); repeatable."""
    limit: int | None = field(default=None, metadata=cli_metadata(min=1))
    """At most this many records."""
    batch_size: int = field(default=64, metadata=cli_metadata(min=1))
    """Prompts per generate call."""

    def __post_init__(self) -> None:
        check_bounds(self)
        from .evaluate import SYSTEMS  # the one list of rows (imports torch: the command is about to load a model)

        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown:
            raise ConfigError(f"unknown system(s) {unknown}; expected some of {', '.join(SYSTEMS)}", field="systems")
