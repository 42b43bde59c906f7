"""What the decode path (decode.py, blocks.py, generate.py, the server's engine) reads from a model: `MixedModel`.

`LoraMixModel` (model.py) is the one implementation; the Protocol names the surface the decoder depends on, so that a
change to the model that the decoder would feel shows here, and so that the decode path's signatures say what they
take instead of `Any` (tests/test_lifecycle.py checks that a LoraMixModel satisfies it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import MixConfig
    from .layers import MixState

__all__ = ["MixedModel"]


@runtime_checkable
class MixedModel(Protocol):
    """A frozen base with its mixed LoRA layers and gate, as the decoder drives it."""

    model: nn.Module
    """The transformers model, its adapted linears replaced by mixed ones (its forward is the mixed pass)."""
    config: MixConfig
    tokenizer: Any
    state: MixState
    """The scalings the mixed layers read during a forward (one thread drives a model at a time)."""
    gate: nn.Module
    last_logits_only: dict[str, int]
    """The forward keyword that computes only the last position's logits ({} when the base cannot)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def n_experts(self) -> int: ...

    @property
    def backbone(self) -> nn.Module: ...

    @property
    def multiplier_dtype(self) -> torch.dtype: ...

    @property
    def rank_sizes(self) -> list[int]: ...

    @property
    def sparse_top_k(self) -> str: ...

    def dummy_scalings(self) -> float | None: ...

    def compute_scalings(self, input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def new_probes(self, batch: int, tokens: int) -> torch.Tensor | None: ...

    def prepare_scalings(self, scalings: torch.Tensor) -> Any: ...

    def rank_multipliers(self, scalings: torch.Tensor) -> torch.Tensor: ...

    def scaling_backbone(self) -> nn.Module: ...

    def use_sparse_top_k(self, tokens: int) -> bool: ...

    def mixed_layers(self) -> Iterator[Any]: ...
