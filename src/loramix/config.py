"""Configuration dataclasses: the gate (`GateConfig`) and the whole mixture (`MixConfig`).

Every option of PEFT's `XLoraConfig` has a field here; `XLORA_NAMES` maps them to the X-LoRA names (PEFT's and
mistral.rs's), shown with each format's exceptions in docs/checkpoint-format.md, "Names".
Sizes that the model determines (hidden size, number of adapted layers, number of experts) are inferred when the
mixture is built, never defaulted: a value given by hand is checked against the model instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["XLORA_NAMES", "GateConfig", "MixConfig", "from_xlora", "to_xlora"]

MAX_GATE_DEPTH = 64
MAX_GATE_WIDTH = 1 << 17
SPARSE_TOP_K = ("auto", "always", "never")
ROUTERS = ("mlp", "arrow")
CONTEXTS = ("none", "ema", "attention")
MIN_TEMPERATURE = 1e-3
"""The smallest gate temperature. The gate computes softmax(logits / temperature) in the model's dtype: at 1e-3 a
logit of magnitude up to 65 stays below float16's largest value (65504) and any logit bfloat16/float32 can hold past
3.4e35 stays finite; below it ordinary logits overflow float16 to Inf and the softmax gives NaN scalings (at 1e-300
the temperature itself rounds to 0 in float32). Nothing is lost: at 1e-3 the softmax is already a hard argmax for any
logit gap above 0.05 (a ratio of e^50)."""


def _check(condition: bool, message: str, field: str) -> None:
    if not condition:
        raise ConfigError(message, field=field)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a wrong type that __post_init__ did not catch
        raise ConfigError(f"{where}: {exc}") from None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GateConfig:
    """The scaling head: an MLP from the scaling pass's hidden states to one scaling per (layer, expert), or a router
    that needs no training (`router`)."""

    router: str = "mlp"
    """"mlp": the paper's learned gate (the fields below). "arrow": no training and no data needed (Arrow routing,
    Ostapenko et al. 2024, PEFT's `arrow`): in the scaling pass each adapted layer scores its input x against every
    expert's prototype, the top right-singular vector of B_e A_e, as |<x, prototype_e>|; the scalings are a softmax
    (with `temperature`) over the `top_k` best (None: all experts). Uses only top_k and temperature. The prototypes
    are the router's weights: train-gate trains them from these values (Arrow as the initialisation)."""

    depth: int = 1
    """Number of linear layers. 1: a single linear map (PEFT `xlora_depth`). Deeper gates put ReLU (and dropout)
    between layers."""

    width: int | None = None
    """Width of the inner layers when depth > 1 (PEFT `xlora_size`). None: the base model's hidden size, which is
    also the only width mistral.rs can load."""

    dropout: float = 0.2
    """Dropout between inner layers, active in training only (PEFT `xlora_dropout_p`). Ignored when depth == 1."""

    softmax: bool = True
    """Softmax over the experts of each (token, layer) (PEFT `enable_softmax`)."""

    temperature: float = 1.0
    """Softmax temperature; lower is sharper (PEFT `softmax_temperature`). At least 1e-3 (`MIN_TEMPERATURE`)."""

    top_k: int | None = None
    """Keep only the k largest scalings per (token, layer), zeroing the rest (PEFT `top_k_lora`). None: dense."""

    topk_softmax: bool = False
    """Re-normalise the kept top-k scalings with a softmax (PEFT `enable_softmax_topk`). Needs top_k."""

    layerwise: bool = False
    """One row of scalings per adapted layer (True) or one row shared by every layer (PEFT `layerwise_scalings`)."""

    bias: bool = True
    """Whether the gate's linear layers have a bias (PEFT always uses one; mistral.rs `use_bias`)."""

    hidden_size: int | None = None
    """Input size of the gate. Leave unset: it is inferred from the base model; a value given is checked."""

    context: str = "none"
    """What the MLP reads of the tokens before (docs/gates.md, "Gates that see the context"). "none": each token's
    own hidden state h_t, the paper's gate. "ema": a moving average over the row's tokens so far,
    sum_i a^(t-i) h_i / sum_i a^(t-i) (a = `context_decay`; padding skipped). "attention": h_t plus a one-head causal
    attention over the row's hidden states so far (width `context_width`, unit queries and keys, the output
    projection zero at first). Causal either way; loramix only (the
    PEFT and mistral.rs exports refuse it)."""

    context_decay: float = 0.9
    """With context="ema": the decay a in (0, 1) per token; the average's weights halve every ln 2 / -ln a tokens
    (6.6 tokens at 0.9)."""

    context_width: int = 64
    """With context="attention": the width of the attention's queries, keys and values."""

    def __post_init__(self) -> None:
        _check(
            self.router in ROUTERS,
            f"gate.router={self.router!r} must be one of {', '.join(map(repr, ROUTERS))}",
            field="router",
        )
        _check(
            is_int(self.depth) and 1 <= self.depth <= MAX_GATE_DEPTH,
            f"gate.depth={self.depth!r} must be an integer from 1 to {MAX_GATE_DEPTH}",
            field="depth",
        )
        _check(
            self.width is None or (is_int(self.width) and 1 <= self.width <= MAX_GATE_WIDTH),
            f"gate.width={self.width!r} must be an integer from 1 to {MAX_GATE_WIDTH}, or unset to use the model's "
            "hidden size",
            field="width",
        )
        _check(
            is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
            f"gate.dropout={self.dropout!r} must be a number in [0, 1)",
            field="dropout",
        )
        _check(isinstance(self.softmax, bool), f"gate.softmax={self.softmax!r} must be true or false", field="softmax")
        _check(
            is_number(self.temperature) and self.temperature >= MIN_TEMPERATURE,
            f"gate.temperature={self.temperature!r} must be a number >= {MIN_TEMPERATURE} (smaller temperatures "
            "overflow the gate's softmax in half precision; 1e-3 is already a hard argmax)",
            field="temperature",
        )
        _check(
            self.top_k is None or (is_int(self.top_k) and self.top_k >= 1),
            f"gate.top_k={self.top_k!r} must be an integer >= 1, or unset for dense mixing",
            field="top_k",
        )
        _check(
            isinstance(self.topk_softmax, bool),
            f"gate.topk_softmax={self.topk_softmax!r} must be true or false",
            field="topk_softmax",
        )
        _check(
            not (self.topk_softmax and self.top_k is None),
            "gate.topk_softmax=true needs gate.top_k (the softmax re-normalises the kept top-k scalings)",
            field="topk_softmax",
        )
        _check(
            isinstance(self.layerwise, bool),
            f"gate.layerwise={self.layerwise!r} must be true or false",
            field="layerwise",
        )
        _check(isinstance(self.bias, bool), f"gate.bias={self.bias!r} must be true or false", field="bias")
        _check(
            self.hidden_size is None or (is_int(self.hidden_size) and self.hidden_size >= 1),
            f"gate.hidden_size={self.hidden_size!r} must be an integer >= 1; leave it unset to infer it",
            field="hidden_size",
        )
        _check(
            self.context in CONTEXTS,
            f"gate.context={self.context!r} must be one of {', '.join(map(repr, CONTEXTS))}",
            field="context",
        )
        _check(
            self.context == "none" or self.router == "mlp",
            f"gate.context={self.context!r} feeds the MLP gate; gate.router={self.router!r} reads no hidden states",
            field="context",
        )
        _check(
            is_number(self.context_decay) and 0.0 < self.context_decay < 1.0,
            f"gate.context_decay={self.context_decay!r} must be a number in (0, 1)",
            field="context_decay",
        )
        _check(
            is_int(self.context_width) and 1 <= self.context_width <= MAX_GATE_WIDTH,
            f"gate.context_width={self.context_width!r} must be an integer from 1 to {MAX_GATE_WIDTH}",
            field="context_width",
        )

    def parameter_count(self, hidden_size: int, n_layers: int, n_experts: int) -> int:
        """Number of gate parameters for a model of these sizes (computed before anything is allocated); 0 for the
        Arrow router, whose weights (its prototypes, N x d_in per adapted layer) are as many as the experts' A rows
        of rank 1."""
        if self.router == "arrow":
            return 0
        width = self.width or hidden_size
        sizes = [hidden_size] + [width] * (self.depth - 1) + [n_layers * n_experts if self.layerwise else n_experts]
        context = 4 * hidden_size * self.context_width if self.context == "attention" else 0  # q, k, v, out
        return context + sum(a * b + (b if self.bias else 0) for a, b in itertools.pairwise(sizes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "gate") -> GateConfig:
        return _from_dict(cls, data, where)


@dataclass
class MixConfig:
    """Everything that defines a mixture besides the experts themselves."""

    gate: GateConfig = field(default_factory=GateConfig)
    """The scaling head (a `GateConfig` or a dict of its fields)."""

    scaling_pass_value: float | None = 0.0
    """Scaling every expert gets in the scaling pass (PEFT `scaling_pass_value`). 0: the scaling pass is the plain
    base model and skips the expert matmuls. None: 1/N for N experts (PEFT's `set_scaling_pass_value(None)`)."""

    global_scaling_weight: float = 1.0
    """Multiplies every expert's output (PEFT `global_scaling_weight`). Applied in both passes, not in the reported
    scalings."""

    trainable_experts: bool = False
    """Train the experts' LoRA matrices with the gate (PEFT `use_trainable_adapters`). Default: only the gate trains."""

    scaling_layer: int | None = None
    """Truncated scaling pass: the gate reads the hidden states after the first k decoder blocks (then the model's
    final norm) and the scaling pass runs only those k blocks. None: all blocks. A gate must be trained with the
    same k it runs with."""

    sparse_top_k: str = "auto"
    """With a top-k gate, whether the mixed layers compute only the experts some token chose (inference only):
    "always", "never", or "auto" where benchmarks/sparse_topk.py measured it faster (decoding, k <= N/4, large
    experts). Outputs are the same either way."""

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig.from_dict(self.gate)
        _check(
            isinstance(self.gate, GateConfig),
            f"gate must be a GateConfig or a dict, got {type(self.gate).__name__}",
            field="gate",
        )
        _check(
            self.scaling_pass_value is None or is_number(self.scaling_pass_value),
            f"scaling_pass_value={self.scaling_pass_value!r} must be a finite number, or null for 1/N",
            field="scaling_pass_value",
        )
        _check(
            is_number(self.global_scaling_weight),
            f"global_scaling_weight={self.global_scaling_weight!r} must be a finite number",
            field="global_scaling_weight",
        )
        _check(
            isinstance(self.trainable_experts, bool),
            f"trainable_experts={self.trainable_experts!r} must be true or false",
            field="trainable_experts",
        )
        _check(
            self.scaling_layer is None or (is_int(self.scaling_layer) and self.scaling_layer >= 1),
            f"scaling_layer={self.scaling_layer!r} must be an integer >= 1 (number of decoder blocks the scaling "
            "pass runs), or unset for all of them",
            field="scaling_layer",
        )
        _check(
            self.sparse_top_k in SPARSE_TOP_K,
            f"sparse_top_k={self.sparse_top_k!r} must be one of {', '.join(map(repr, SPARSE_TOP_K))}",
            field="sparse_top_k",
        )

    def validate_for(
        self,
        *,
        hidden_size: int,
        n_experts: int,
        n_blocks: int | None,
        n_layers: int | None = None,
        base_parameters: int | None = None,
    ) -> None:
        """Check the config against the sizes of a concrete model; raise `ConfigError` naming the field.

        n_layers, base_parameters: the number of adapted layers and of base-model parameters; when given, a gate
        with more parameters than the base model itself is refused before it is allocated.
        """
        g = self.gate
        if n_layers is not None and base_parameters is not None:
            count = g.parameter_count(hidden_size, n_layers, n_experts)
            if count > max(base_parameters, 1 << 20):
                raise ConfigError(
                    f"gate.depth={g.depth} and gate.width={g.width} give a gate of {count:,} parameters, more than "
                    f"the base model's {base_parameters:,}; choose a smaller width or depth",
                    field="depth",
                )
        if g.hidden_size is not None and g.hidden_size != hidden_size:
            raise ConfigError(
                f"gate.hidden_size={g.hidden_size} does not match the base model's hidden size {hidden_size}; "
                "leave it unset to infer it",
                field="hidden_size",
            )
        if g.top_k is not None and g.top_k > n_experts:
            raise ConfigError(f"gate.top_k={g.top_k} is larger than the number of experts ({n_experts})", field="top_k")
        if g.router == "arrow" and self.scaling_layer is not None:
            raise ConfigError(
                "gate.router='arrow' reads every adapted layer in the scaling pass; a truncated scaling pass "
                f"(scaling_layer={self.scaling_layer}) would leave the later layers unrouted",
                field="scaling_layer",
            )
        if self.scaling_layer is not None and n_blocks is not None and self.scaling_layer > n_blocks:
            raise ConfigError(
                f"scaling_layer={self.scaling_layer} is out of range: the base model has {n_blocks} decoder blocks",
                field="scaling_layer",
            )

    def resolved_scaling_pass_value(self, n_experts: int) -> float:
        return 1.0 / n_experts if self.scaling_pass_value is None else float(self.scaling_pass_value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "mix config") -> MixConfig:
        return _from_dict(cls, data, where)


# ---------------------------------------------------------------------- X-LoRA names

XLORA_NAMES: dict[str, str] = {
    "gate.depth": "xlora_depth",
    "gate.width": "xlora_size",
    "gate.dropout": "xlora_dropout_p",
    "gate.softmax": "enable_softmax",
    "gate.temperature": "softmax_temperature",
    "gate.top_k": "top_k_lora",
    "gate.topk_softmax": "enable_softmax_topk",
    "gate.layerwise": "layerwise_scalings",
    "gate.hidden_size": "hidden_size",
    "scaling_pass_value": "scaling_pass_value",
    "global_scaling_weight": "global_scaling_weight",
    "trainable_experts": "use_trainable_adapters",
}
"""loramix field -> its X-LoRA name: PEFT's `XLoraConfig` and mistral.rs's `xlora_config.json` use the same names.
The one table of the mapping (docs/checkpoint-format.md, "Names", shows it with the exceptions of each format)."""


def to_xlora(config: MixConfig, hidden_size: int, n_experts: int) -> dict[str, Any]:
    """The options of `config` under their X-LoRA names, with the sizes X-LoRA needs written out: `xlora_size` is the
    hidden size when the width is unset, `scaling_pass_value` is 1/N when it is null."""
    resolved = {
        "gate.width": config.gate.width or hidden_size,
        "gate.hidden_size": hidden_size,
        "scaling_pass_value": config.resolved_scaling_pass_value(n_experts),
    }
    out = {}
    for path, name in XLORA_NAMES.items():
        owner, _, attr = path.rpartition(".")
        out[name] = resolved[path] if path in resolved else getattr(config.gate if owner else config, attr)
    return out


def from_xlora(values: dict[str, Any], *, width: int | None, bias: bool) -> MixConfig:
    """A `MixConfig` from X-LoRA options by name (absent or null ones take loramix's defaults). The gate's `width`
    (None for a depth-1 gate) and `bias` come from its tensors, which X-LoRA configs do not describe exactly."""
    fields = {path: values[name] for path, name in XLORA_NAMES.items() if values.get(name) is not None}
    fields.update({"gate.width": width, "gate.bias": bias})
    gate = {path.removeprefix("gate."): v for path, v in fields.items() if path.startswith("gate.")}
    rest = {path: v for path, v in fields.items() if not path.startswith("gate.")}
    return MixConfig(gate=GateConfig(**gate), **rest)
