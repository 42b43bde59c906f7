"""`LoraMixModel`: a frozen HF causal LM, N frozen LoRA experts and a learned gate, with the dual-pass forward.

    input_ids -> 1. scaling pass: the backbone only (no LM head), experts at the dummy scaling
                    (0 by default: `MixState.scalings = None`, the mixed layers skip the expert matmuls)
                    -> hidden states h [B, T, H]  (after all blocks, or after `scaling_layer` blocks)
              -> 2. gate: ScalingHead(h) -> scalings s [B, T, L, N]
              -> 3. mixed pass: the whole model, every MixedLoRALinear l reads s[:, :, l, :] from `MixState`
              -> logits [B, T, V], scalings [B, T, L, N]

Both passes call the unmodified transformers model; the only thing that changes between them is the value held
by `self.state`, set through a context manager for the duration of the pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .base import LoraMixCache, load_base_model, load_tokenizer, new_dynamic_cache, text_config
from .checkpoint import save_checkpoint
from .config import MixConfig
from .errors import ConfigError, LoramixError
from .experts import ExpertInfo, StackedLoRA, linear_features, read_adapter, stack_experts, unstack_experts
from .gate import GateCache, arrow_prototypes, build_gate
from .generate import GenerationOutput, generate, stream
from .layers import MixedLoRALinear, MixState, PreparedScalings, rank_multipliers
from .layout import apply_cpu_layout, restore_layout
from .quant import compute_dtype

logger = logging.getLogger(__name__)

__all__ = ["LoraMixModel", "LoraMixOutput", "from_pretrained"]


@dataclass
class LoraMixOutput(ModelOutput):
    """Output of `LoraMixModel.forward`. `scalings` [B, T, L, N] are what the mixed pass used."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    scalings: torch.Tensor | None = None
    past_key_values: LoraMixCache | None = None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def find_blocks(backbone: nn.Module, n_blocks: int | None) -> tuple[str, nn.ModuleList] | None:
    """The backbone's list of decoder blocks: its ModuleList child with `num_hidden_layers` entries."""
    candidates = [(n, m) for n, m in backbone.named_children() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_blocks is not None:
        exact = [(n, m) for n, m in candidates if len(m) == n_blocks]
        if exact:
            return exact[0]
    return candidates[0] if len(candidates) == 1 else None


class LoraMixModel(nn.Module):
    """A mixture of frozen LoRA experts inside a frozen causal LM, mixed per token and per layer by a gate.

    Build one with `loramix.from_pretrained`, `loramix.load` or `loramix.from_peft`. Attributes:
        model:       the transformers model, its adapted linears replaced by `MixedLoRALinear`
        gate:        the `ScalingHead` (the only trainable part by default)
        state:       the `MixState` every mixed layer reads
        config:      the `MixConfig`
        experts:     list of `ExpertInfo` (index = expert index in the scalings)
        layer_names: adapted module paths (index = layer index in the scalings)
    """

    def __init__(
        self,
        model: nn.Module,
        stacked: Mapping[str, StackedLoRA],
        experts: Sequence[ExpertInfo],
        config: MixConfig | None = None,
        *,
        tokenizer: Any = None,
        base_reference: str | None = None,
    ) -> None:
        super().__init__()
        config = config if config is not None else MixConfig()
        names = [e.name for e in experts]
        if not names:
            raise ConfigError("experts: at least one expert is needed")
        if len(set(names)) != len(names):
            raise ConfigError(f"experts: names must be unique, got {names}")
        if not stacked:  # never a silent no-op mixture (the failure of xlora #22 over 4-bit bases)
            raise ConfigError(
                f"the experts {names} adapt no module of the base model {type(model).__name__}: the mixture would be "
                "the plain base; check the adapters' target modules against the base"
            )
        text = text_config(model)
        hidden_size = getattr(text, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ConfigError(f"cannot infer the hidden size of {type(model).__name__}: its config has no hidden_size")
        backbone = getattr(model, "base_model", model)
        n_blocks_config = getattr(text, "num_hidden_layers", None)
        blocks = find_blocks(backbone, n_blocks_config)
        self._blocks_attr = blocks[0] if blocks else None
        self.n_blocks = len(blocks[1]) if blocks else n_blocks_config
        config.validate_for(
            hidden_size=hidden_size,
            n_experts=len(names),
            n_blocks=self.n_blocks,
            n_layers=len(stacked),
            base_parameters=sum(p.numel() for p in model.parameters()),
        )
        if config.scaling_layer is not None and self._blocks_attr is None:
            raise ConfigError(
                f"scaling_layer={config.scaling_layer}: cannot find the decoder blocks of {type(backbone).__name__}"
            )

        self.config = config
        self.experts = list(experts)
        self.tokenizer = tokenizer
        self.base_reference = base_reference
        self.state = MixState(config.global_scaling_weight)
        self.model = model
        # forward kwargs that compute the logits of the last position only, where the base supports it
        # (transformers' `logits_to_keep`): a prompt's prefill in generation needs no more, and the [B, T, V] logits
        # of a long batch are the largest tensor of the step (SmolLM2, 32 prompts of 70 tokens: 440 MB)
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only: dict[str, int] = {"logits_to_keep": 1} if keeps else {}
        self.layer_names = list(stacked)
        for index, (path, st) in enumerate(stacked.items()):
            base_layer = model.get_submodule(path)
            if isinstance(base_layer, MixedLoRALinear):
                raise ConfigError(f"module '{path}' is already a mixed layer; build the mixture on a plain base model")
            check_stacked(path, st, base_layer, len(names))
            _set_submodule(model, path, MixedLoRALinear(base_layer, st, index, self.state))
        first = next(iter(self.mixed_layers())).base_layer
        weight, dtype = first.weight, compute_dtype(first)  # never a quantized storage dtype
        self.gate = build_gate(config.gate, hidden_size, len(self.layer_names), len(names)).to(weight.device, dtype)
        if self.gate.reads_probes:  # the router's weights, read by every mixed layer through the state
            self.gate.set_prototypes([arrow_prototypes(layer.lora_A, layer.lora_B, layer.ranks, layer.scales)
                                      for layer in self.mixed_layers()])
            self.state.prototypes = self.gate.prototypes
        # One gather turns scalings [B, T, L, N] into every layer's rank multipliers (see prepare_scalings).
        layers = list(self.mixed_layers())
        self._rank_sizes = [layer.lora_A.shape[0] for layer in layers]
        index = [layer.rank_expert + i * len(names) for i, layer in enumerate(layers)]
        self.register_buffer("_rank_index", torch.cat(index).to(weight.device), persistent=False)
        self.register_buffer("_rank_scale", torch.cat([layer.rank_scale for layer in layers]), persistent=False)
        self._mean_expert_elements = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers) / len(layers)
        self._views: dict[int, nn.Module] = {}  # truncated views of the backbone (see scaling_backbone); not submodules
        self.freeze()
        self.eval()  # like transformers' from_pretrained: call .train() to train the gate
        apply_cpu_layout(model)  # a frozen float32 base on a CPU: its wide linears stored transposed (layout.py)

    # ------------------------------------------------------------------ structure

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def n_layers(self) -> int:
        """Number of adapted layers L (the scalings' third dimension)."""
        return len(self.layer_names)

    @property
    def hidden_size(self) -> int:
        return self.gate.hidden_size

    @property
    def device(self) -> torch.device:
        return self._gate_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._gate_tensor().dtype

    def _gate_tensor(self) -> torch.Tensor:
        """Where the gate computes (its last weight; for a router without parameters, the experts' scales)."""
        last = getattr(self.gate, "last", None)
        return last.weight if last is not None else self._rank_scale

    @property
    def backbone(self) -> nn.Module:
        """The transformer body without the LM head (`model.base_model`: `.model` in Llama, `.transformer` in GPT-2)."""
        return getattr(self.model, "base_model", self.model)

    @property
    def global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    @global_scaling_weight.setter
    def global_scaling_weight(self, value: float) -> None:
        self.config.global_scaling_weight = float(value)
        self.state.global_scaling_weight = float(value)

    @property
    def sparse_top_k(self) -> str:
        """`MixConfig.sparse_top_k`: "auto", "always" or "never" (saved with the checkpoint)."""
        return self.config.sparse_top_k

    @sparse_top_k.setter
    def sparse_top_k(self, value: str) -> None:
        self.config = dataclasses.replace(self.config, sparse_top_k=value)  # validated like a saved config

    def mixed_layers(self) -> Iterator[MixedLoRALinear]:
        """The mixed layers in layer-index order."""
        for path in self.layer_names:
            yield self.model.get_submodule(path)

    def stacked_experts(self) -> dict[str, StackedLoRA]:
        """Each mixed layer's experts as stacked tensors, by layer path (in layer-index order)."""
        return {path: layer.stacked() for path, layer in zip(self.layer_names, self.mixed_layers())}

    def expert_tensors(self) -> list[dict[str, torch.Tensor]]:
        """Per expert, its tensors under PEFT's names (`loramix.experts.unstack_experts`: views, not copies)."""
        return unstack_experts(self.stacked_experts(), self.n_experts)

    def freeze(self) -> None:
        """Base frozen; experts frozen unless `config.trainable_experts`; the gate trainable."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.config.trainable_experts:
            for layer in self.mixed_layers():
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
        for p in self.gate.parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ the two passes

    def dummy_scalings(self) -> float | None:
        """What the mixed layers use in the scaling pass: None (experts off) or one scaling for every expert."""
        value = self.config.resolved_scaling_pass_value(self.n_experts)
        return None if value == 0.0 else value

    def scaling_pass(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        probes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pass 1, without gradients: the backbone at the dummy scaling -> hidden states [B, T, H] (and, with
        `probes` [B, T, L, N], what every adapted layer scores its input at; see `new_probes`: these carry gradients
        to the router's prototypes when gradients are enabled)."""
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        probe_grad = probes is not None and torch.is_grad_enabled()  # a router trained on the probes
        with torch.no_grad(), self.state.use(self.dummy_scalings(), probes, probe_grad):
            if self.backbone is not self.model:
                return self.scaling_backbone()(**kwargs, return_dict=True).last_hidden_state
            # No separate body (the constructor refuses scaling_layer there): the full model's last hidden state.
            return self.model(**kwargs, output_hidden_states=True, return_dict=True).hidden_states[-1]

    def compute_scalings(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        gate_cache: GateCache | None = None,
    ) -> torch.Tensor:
        """Scaling pass + gate: scalings [B, T, L, N] (with gradients to the gate only).

        `gate_cache`: with `past_key_values` and a gate that reads context (`GateConfig.context`), the gate's own
        cache of the earlier tokens (`LoraMixCache.gate`, from `new_cache`), read and extended."""
        if inputs_embeds is not None and not bool(torch.isfinite(inputs_embeds).all()):
            raise ConfigError("inputs_embeds contain NaN or infinite values; they would reach the gate")
        if past_key_values is not None and gate_cache is None and self.gate.has_context:
            raise ConfigError(
                f"gate.context={self.config.gate.context!r}: a cached scaling pass needs the gate's cache too "
                "(gate_cache=, the `gate` of a LoraMixCache from model.new_cache()), or the gate would not see "
                "the earlier tokens"
            )
        reference = input_ids if input_ids is not None else inputs_embeds
        probes = self.new_probes(reference.shape[0], reference.shape[1]) if reference is not None else None
        hidden = self.scaling_pass(
            input_ids, attention_mask, position_ids, inputs_embeds, past_key_values, use_cache, probes
        )
        return self.gate(hidden, probes, attention_mask, gate_cache)

    def new_probes(self, batch: int, tokens: int) -> torch.Tensor | None:
        """The buffer [B, T, L, N] that the adapted layers fill in the scaling pass when the gate reads it (the
        Arrow router); None for the MLP gate."""
        if not self.gate.reads_probes:
            return None
        return torch.zeros(batch, tokens, self.n_layers, self.n_experts, device=self.device, dtype=self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: LoraMixCache | None = None,
        use_cache: bool | None = None,
        scalings: torch.Tensor | float | None = None,
        **kwargs: Any,
    ) -> LoraMixOutput:
        """Dual-pass forward. input_ids [B, T] -> logits [B, T, V], scalings [B, T, L, N].

        `scalings`: skip the scaling pass and mix with these instead (a [B, T, L, N] tensor, a `PreparedScalings`,
        or one float for every expert).
        `labels` [B, T]: next-token loss of the mixed pass (transformers' shift and -100 convention).
        `past_key_values`: a `LoraMixCache` (see generate.py); `use_cache` defaults to True when one is given.
        """
        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if scalings is None:
            scalings = self.compute_scalings(
                input_ids,
                attention_mask,
                position_ids,
                inputs_embeds,
                past_key_values.scaling if past_key_values is not None else None,
                use_cache,
                past_key_values.gate if past_key_values is not None else None,
            )
        prepared = self.prepare_scalings(scalings) if isinstance(scalings, torch.Tensor) else scalings
        with self.state.use(prepared):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                past_key_values=past_key_values.mixed if past_key_values is not None else None,
                use_cache=use_cache,
                return_dict=True,
                **kwargs,
            )
        return LoraMixOutput(
            loss=out.loss,
            logits=out.logits,
            scalings=prepared.scalings if isinstance(prepared, PreparedScalings) else None,
            past_key_values=past_key_values if use_cache else None,
        )

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> GenerationOutput:
        """Generate with two KV caches; see `loramix.generate.generate` for the arguments and speed modes."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, prompt: str | torch.Tensor, **kwargs: Any) -> Iterator[str]:
        """Yield generated text piece by piece; see `loramix.generate.stream`."""
        return stream(self, prompt, **kwargs)

    def prepare_scalings(self, scalings: torch.Tensor) -> PreparedScalings:
        """Scalings [B, T, L, N] -> every mixed layer's rank multipliers, in one gather and one multiply.

        With a top-k gate and `sparse_top_k` allowing it, also the experts each layer actually needs (see
        `use_sparse_top_k`), so that the mixed layers compute only those.
        """
        check_scalings(scalings, self.n_layers, self.n_experts)
        mult = self.rank_multipliers(scalings)
        used = None
        if self.use_sparse_top_k(scalings.shape[0] * scalings.shape[1]):
            mask = (scalings != 0).flatten(0, 1).any(0).cpu()  # [L, N]
            used = [tuple(row.nonzero().flatten().tolist()) for row in mask]
        return PreparedScalings(scalings, list(mult.split(self._rank_sizes, dim=-1)), used)

    @property
    def multiplier_dtype(self) -> torch.dtype:
        """The dtype of the rank multipliers (that of the experts)."""
        return self._rank_scale.dtype

    @property
    def rank_sizes(self) -> list[int]:
        """R_l, the number of rank rows (all experts) of each mixed layer, in layer-index order."""
        return list(self._rank_sizes)

    def rank_multipliers(self, scalings: torch.Tensor) -> torch.Tensor:
        """Scalings [B, T, L, N] -> every layer's rank multipliers side by side, [B, T, sum_l R_l] (one gather)."""
        flat = scalings.reshape(*scalings.shape[:2], self.n_layers * self.n_experts)
        return rank_multipliers(flat, self._rank_index, self._rank_scale, self.state.global_scaling_weight)

    def scaling_backbone(self) -> nn.Module:
        """The module the scaling pass runs: the backbone, or with `config.scaling_layer` = k < blocks a view of it
        that holds only the first k blocks (same parameters, built once). Nothing is swapped
        during a pass, so a compiled decode step can call it; the scaling pass runs it too."""
        k = self.config.scaling_layer
        backbone = self.backbone
        if k is None or k == self.n_blocks:
            return backbone
        if self._blocks_attr is None or self.n_blocks is None or k > self.n_blocks:
            raise ConfigError(f"scaling_layer={k} is out of range for {self.n_blocks} decoder blocks")
        view = self._views.get(k)
        if view is None:
            import copy

            view = copy.copy(backbone)
            view._modules = dict(backbone._modules)
            view._modules[self._blocks_attr] = nn.ModuleList(list(getattr(backbone, self._blocks_attr))[:k])
            self._views[k] = view
        return view

    def use_sparse_top_k(self, tokens: int) -> bool:
        """Whether a pass over `tokens` tokens computes only the chosen experts (top-k gates, inference only).

        `MixConfig.sparse_top_k`: "always" / "never" force it; "auto" (default) uses it where
        benchmarks/sparse_topk.py measured it faster on CPU: one or two tokens per pass (decoding), k <= N/4, and
        expert matrices of at least ~1M elements per layer. Elsewhere the dense stacked matmul wins: gathering rows
        costs more than computing them.
        """
        k = self.config.gate.top_k
        if k is None or self.sparse_top_k == "never" or torch.is_grad_enabled():
            return False
        if self.sparse_top_k == "always":
            return True
        return tokens <= 2 and 4 * k <= self.n_experts and self._mean_expert_elements >= 1_000_000

    def new_cache(self) -> LoraMixCache:
        """Two empty transformers `DynamicCache`s, one per pass (and the gate's own, when it reads context)."""
        config = text_config(self.model)
        return LoraMixCache(
            scaling=new_dynamic_cache(config), mixed=new_dynamic_cache(config), gate=self.gate.new_cache()
        )

    @contextlib.contextmanager
    def experts_disabled(self) -> Iterator[None]:
        """Inside this context the model is the plain base model (every mixed layer skips its experts)."""
        with self.state.use(None):
            yield

    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's own forward, experts off."""
        with self.experts_disabled():
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, include_base: bool = False, overwrite: bool = True) -> Path:
        """Write a self-contained checkpoint directory (atomically). See docs/checkpoint-format.md."""
        return save_checkpoint(self, path, include_base=include_base, overwrite=overwrite)

    @contextlib.contextmanager
    def plain_model(self) -> Iterator[nn.Module]:
        """The transformers model with its original base layers back in place, for the duration of the context
        (e.g. to `save_pretrained` the base). The mixed layers return on exit."""
        mixed = list(self.mixed_layers())
        for path, layer in zip(self.layer_names, mixed):
            _set_submodule(self.model, path, layer.base_layer)
        try:
            yield self.model
        finally:
            for path, layer in zip(self.layer_names, mixed):
                _set_submodule(self.model, path, layer)

    def unload(self) -> nn.Module:
        """Put the original base layers back and return the plain transformers model (this object is then unusable)."""
        for path in self.layer_names:
            _set_submodule(self.model, path, self.model.get_submodule(path).base_layer)
        model = self.model
        restore_layout(model)
        self.layer_names = []
        return model

    def extra_repr(self) -> str:
        return f"experts={self.expert_names}, adapted_layers={self.n_layers}"


def check_scalings(scalings: torch.Tensor, n_layers: int, n_experts: int) -> None:
    if scalings.dim() != 4 or scalings.shape[-2:] != (n_layers, n_experts):
        raise ConfigError(
            f"scalings have shape {tuple(scalings.shape)}; expected [batch, tokens, {n_layers}, {n_experts}] "
            "(adapted layers x experts)"
        )


def check_stacked(path: str, st: StackedLoRA, module: nn.Module, n_experts: int) -> None:
    """Check stacked expert tensors against the base module they are for; raise naming the module and both shapes."""
    from .errors import ShapeMismatchError

    features = linear_features(module)
    if features is None:
        raise LoramixError(f"module '{path}' is a {type(module).__name__}; loramix mixes nn.Linear and Conv1D only")
    d_in, d_out = features
    if len(st.ranks) != n_experts or len(st.scales) != n_experts:
        raise ShapeMismatchError(f"module '{path}': {len(st.ranks)} ranks for {n_experts} experts")
    total = sum(st.ranks)
    if tuple(st.lora_A.shape) != (total, d_in) or tuple(st.lora_B.shape) != (d_out, total):
        raise ShapeMismatchError(
            f"module '{path}': stacked lora_A {tuple(st.lora_A.shape)} and lora_B {tuple(st.lora_B.shape)} do not "
            f"fit the base layer {d_in} -> {d_out} (expected [{total}, {d_in}] and [{d_out}, {total}])"
        )


# ---------------------------------------------------------------------- building


def _expert_items(experts: Mapping[str, Any] | Sequence[Any]) -> list[tuple[str, Any]]:
    if isinstance(experts, Mapping):
        items = [(str(k), v) for k, v in experts.items()]
    elif isinstance(experts, (list, tuple)):
        items = [(Path(str(p)).name, p) for p in experts]
    else:
        raise ConfigError("experts must be a {name: adapter_dir} mapping or a list of adapter dirs")
    if not items:
        raise ConfigError("experts: at least one expert is needed")
    for name, _ in items:
        if not name.strip():
            raise ConfigError("experts: names must be non-empty strings")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"experts: names must be unique, got {names}")
    return items


def from_pretrained(
    base: Any,
    experts: Mapping[str, str | Path] | Sequence[str | Path],
    config: MixConfig | None = None,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: Any = None,
    **model_kwargs: Any,
) -> LoraMixModel:
    """Build a mixture from a base model and PEFT LoRA adapter directories (the gate is freshly initialised).

    base:     a model id or directory (loaded with `AutoModelForCausalLM`), or a loaded `PreTrainedModel`
              (used in place: its adapted linears are replaced by mixed layers).
    experts:  {name: adapter_dir}, any names; or a list of dirs (named after the dir).
    config:   `MixConfig`; sizes are inferred from the model.
    tokenizer: kept with the model (and saved in checkpoints); loaded from `base` when it is an id/path.
    quantize: load the base quantized: "int8", "int4", "nf4" or a transformers quantization config (the same as
              `quantization_config=`); see docs/quantization.md. Experts and gate stay in the compute dtype.
    """
    items = _expert_items(experts)
    model, reference = load_base_model(base, dtype=dtype, device=device, quantize=quantize, **model_kwargs)
    if tokenizer is None and isinstance(base, (str, Path)):
        tokenizer = load_tokenizer(base)
    loaded = [read_adapter(name, path) for name, path in items]
    stacked = stack_experts(loaded, model)
    infos = [ExpertInfo(e.name, e.adapter_config, e.source) for e in loaded]
    logger.info("mixing %d experts over %d adapted layers", len(infos), len(stacked))
    return LoraMixModel(model, stacked, infos, config, tokenizer=tokenizer, base_reference=reference)
