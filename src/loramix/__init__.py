"""loramix: mix frozen LoRA experts per token and per layer inside a frozen causal LM (X-LoRA).

import loramix
model = loramix.from_pretrained("base-id-or-dir", experts={"a": "adapters/a", "b": "adapters/b"},
                                config=loramix.MixConfig(gate=loramix.GateConfig(depth=2, layerwise=True)))
out = model(input_ids, attention_mask=mask)   # out.logits [B,T,V], out.scalings [B,T,L,N]
model.save("ckpt/"); model = loramix.load("ckpt/")
"""

from typing import TYPE_CHECKING

from .errors import (
    AdapterError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    LoramixError,
    ShapeMismatchError,
)
from .version import __version__

if TYPE_CHECKING:  # the names below import torch: loaded on first use (`loramix --help` needs none of them)
    from .base import LoraMixCache
    from .config import GateConfig, MixConfig
    from .experts import ExpertInfo, read_adapter
    from .gate import ScalingHead
    from .interop.peft import from_peft
    from .layers import MixedLoRALinear, MixState
    from .loading import load
    from .model import LoraMixModel, LoraMixOutput, from_pretrained

_LAZY = {
    "LoraMixCache": "base",
    "GateConfig": "config",
    "MixConfig": "config",
    "ExpertInfo": "experts",
    "read_adapter": "experts",
    "ScalingHead": "gate",
    "from_peft": "interop.peft",
    "MixedLoRALinear": "layers",
    "MixState": "layers",
    "load": "loading",
    "LoraMixModel": "model",
    "LoraMixOutput": "model",
    "from_pretrained": "model",
}


def __getattr__(name: str) -> object:
    """The public API's torch-backed names, imported when first used (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'loramix' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterError",
    "BaseModelMismatchError",
    "CheckpointError",
    "ConfigError",
    "ExpertInfo",
    "GateConfig",
    "LoraMixCache",
    "LoraMixModel",
    "LoraMixOutput",
    "LoramixError",
    "MixConfig",
    "MixState",
    "MixedLoRALinear",
    "ScalingHead",
    "ShapeMismatchError",
    "__version__",
    "from_peft",
    "from_pretrained",
    "load",
    "read_adapter",
]
