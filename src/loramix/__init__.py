"""loramix: mix frozen LoRA experts per token and per layer inside a frozen causal LM (X-LoRA).

import loramix
model = loramix.from_pretrained("base-id-or-dir", experts={"a": "adapters/a", "b": "adapters/b"},
                                config=loramix.MixConfig(gate=loramix.GateConfig(depth=2, layerwise=True)))
out = model(input_ids, attention_mask=mask)   # out.logits [B,T,V], out.scalings [B,T,L,N]
model.save("ckpt/"); model = loramix.load("ckpt/")
"""

from .base import LoraMixCache
from .config import GateConfig, MixConfig
from .errors import (
    AdapterError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    LoramixError,
    ShapeMismatchError,
)
from .experts import ExpertInfo, read_adapter
from .gate import ScalingHead
from .interop.peft import from_peft
from .layers import MixedLoRALinear, MixState
from .loading import load
from .model import LoraMixModel, LoraMixOutput, from_pretrained
from .version import __version__

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
