"""mistral.rs interop: export a `LoraMixModel` to the flat X-LoRA directory mistral.rs 0.9.5 serves, and import
X-LoRA directories (that flat layout, or the original X-LoRA layout with one sub-folder per adapter).

    out/                                   (flat: mistral.rs lists only the top level of a local directory)
      xlora_config.json                    every option written explicitly (mistral.rs defaults differ from PEFT's)
      xlora_classifier.safetensors         the gate: inner.{i}.weight/bias ..., last.weight/bias (model dtype)
      NAME.adapter_config.json             per expert: its PEFT adapter config, r/lora_alpha/target_modules
      NAME.adapter_model.safetensors       made consistent with the tensors; standard PEFT tensor names
      ordering.json                        {"base_model_id", "order": [NAME, ...], "layers": {module: index}}

mistral.rs matches expert files by substring of NAME, scales experts by alpha/r only, needs the same target modules
for every expert and a gate whose inner width is the hidden size: what it cannot represent is refused with an
`ExportError`, never exported to a directory that would load and silently give other tokens.
docs/formats.md ("mistral.rs") has the details and the upstream limits.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..base import load_base_model, load_tokenizer
from ..config import XLORA_NAMES, MixConfig, from_xlora, to_xlora
from ..errors import AdapterError, CheckpointError, LoramixError
from ..experts import (
    ExpertInfo,
    check_adapter_config,
    expert_from_state_dict,
    linear_features,
    stack_experts,
    unstack_experts,
)
from ..io import atomic_directory, check_replaceable, read_json, read_tensors, save_tensors, write_json
from ..loading import load_gate_state
from ..model import LoraMixModel
from ..quant import describe_quantization

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "ExportError", "export_mistralrs", "import_xlora"]

XLORA_CONFIG = "xlora_config.json"
CLASSIFIER = "xlora_classifier.safetensors"
ORDERING = "ordering.json"
ADAPTER_CONFIG_SUFFIX = ".adapter_config.json"
_XLORA_FILES = ("xlora_config.json", "xlora_classifier.safetensors", "ordering.json", "*.adapter_config.json",
                "*.adapter_model.safetensors")  # written by older loramix versions, before manifests
ADAPTER_WEIGHTS_SUFFIX = ".adapter_model.safetensors"
BASE_WEIGHTS = "model.safetensors"

# transformers model_type -> mistral.rs Architecture: those whose X-LoRA model was checked token for token against
# loramix with mistral.rs 0.9.5 (tests/test_mistralrs.py covers Llama; docs/formats.md, "Architectures", lists the
# rest).
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "gemma": "Gemma", "phi": "Phi2", "phi3": "Phi3"}
_UNSUPPORTED_MODEL_TYPES = {
    "gemma2": "its X-LoRA Gemma2 panics at the first step ('entered unreachable code')",
    "starcoder2": "its X-LoRA Starcoder2 panics at the first step ('entered unreachable code')",
    "mixtral": "it expects per-expert block_sparse_moe tensors; transformers 5 stores fused experts",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ExportError(LoramixError):
    """A mixture cannot be exported to mistral.rs as it is (the message says which part and why)."""


# ---------------------------------------------------------------------- export


def _expert_files(name: str) -> tuple[str, str]:
    return name + ADAPTER_CONFIG_SUFFIX, name + ADAPTER_WEIGHTS_SUFFIX


def _check_names(names: list[str]) -> None:
    for name in names:
        if not _SAFE_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
            raise ExportError(
                f"expert name {name!r} is not a safe file name: mistral.rs reads NAME.adapter_config.json from a flat "
                "directory; use letters, digits, '_', '-' and '.' (not first), e.g. rename it when building the model"
            )
    files = [XLORA_CONFIG, CLASSIFIER, ORDERING] + [f for n in names for f in _expert_files(n)]
    for name in names:
        own = set(_expert_files(name))
        clash = [f for f in files if f not in own and name in f]
        if clash:
            raise ExportError(
                f"expert name {name!r} is a substring of the file name '{clash[0]}': mistral.rs assigns files to "
                "experts by substring, so no name may occur in another expert's file names or in "
                f"{XLORA_CONFIG}/{CLASSIFIER}/{ORDERING}; rename the expert"
            )


def _expert_tables(model: LoraMixModel) -> list[dict[str, Any]]:
    """Per expert: its adapted modules (rank > 0) with their rank and scale, checked for what mistral.rs can load."""
    tables: list[dict[str, Any]] = [{"modules": {}} for _ in model.experts]
    for path, layer in zip(model.layer_names, model.mixed_layers()):
        for e, (rank, scale) in enumerate(zip(layer.ranks, layer.scales)):
            if rank > 0:
                tables[e]["modules"][path] = (int(rank), float(scale))
    names = model.expert_names
    for e, (info, table) in enumerate(zip(model.experts, tables)):
        if info.adapter_config.get("use_rslora"):
            raise ExportError(
                f"expert '{info.name}': adapter_config use_rslora=true (scale alpha/sqrt(r)); mistral.rs scales every "
                "expert by lora_alpha/r only and would give other outputs"
            )
        if not table["modules"]:
            raise ExportError(f"expert '{info.name}' adapts no module; mistral.rs needs every expert on every target")
        ranks = sorted({r for r, _ in table["modules"].values()})
        if len(ranks) > 1:
            raise ExportError(
                f"expert '{info.name}': ranks {ranks} differ between modules (rank_pattern); mistral.rs reads one "
                "'r' per expert from adapter_config.json"
            )
        scales = [s for _, s in table["modules"].values()]
        if max(scales) - min(scales) > 1e-6 * max(abs(s) for s in scales):
            raise ExportError(
                f"expert '{info.name}': scales alpha/r {sorted(set(scales))} differ between modules (alpha_pattern); "
                "mistral.rs reads one 'lora_alpha' per expert from adapter_config.json"
            )
        table["rank"], table["scale"] = ranks[0], scales[0]
        if e > 0 and set(table["modules"]) != set(tables[0]["modules"]):
            only_here = sorted(set(table["modules"]) - set(tables[0]["modules"]))
            only_there = sorted(set(tables[0]["modules"]) - set(table["modules"]))
            example = (only_here or only_there)[0]
            raise ExportError(
                f"experts '{names[0]}' and '{info.name}' adapt different modules (e.g. '{example}'): mistral.rs needs "
                "the same target_modules for every expert"
            )
    return tables


def _target_names(model: LoraMixModel, adapted: set[str]) -> list[str]:
    """The module names (last path component) mistral.rs matches, checked to cover exactly the adapted modules."""
    targets = sorted({path.rpartition(".")[2] for path in adapted})
    for path, module in model.model.named_modules():
        if path in adapted or path.rpartition(".")[2] not in targets or linear_features(module) is None:
            continue
        raise ExportError(
            f"module '{path}' is not adapted although other '{path.rpartition('.')[2]}' modules are (e.g. "
            "layers_to_transform): mistral.rs adapts every module whose name is in target_modules"
        )
    return targets


def _check_lm_head(model: LoraMixModel) -> None:
    output = model.model.get_output_embeddings() if hasattr(model.model, "get_output_embeddings") else None
    for path, layer in zip(model.layer_names, model.mixed_layers()):
        if path.rpartition(".")[2] == "lm_head" or (output is not None and layer.base_layer is output):
            raise ExportError(f"module '{path}' (the LM head) is an expert target; mistral.rs cannot adapt lm_head")


def _check_gate(model: LoraMixModel) -> None:
    gate = model.config.gate
    if gate.router != "mlp":
        raise ExportError(
            f"gate.router={gate.router!r}: mistral.rs's X-LoRA runs the MLP gate only; export to a static LoRA instead"
        )
    if gate.context != "none":
        raise ExportError(
            f"gate.context={gate.context!r}: mistral.rs's X-LoRA runs the per-token MLP gate only (no context); "
            "export to a static LoRA instead"
        )
    width = gate.width or model.hidden_size
    if gate.depth > 1 and width != model.hidden_size:
        raise ExportError(
            f"gate.width={width} with gate.depth={gate.depth}: mistral.rs builds the gate's last layer from the hidden "
            f"size ({model.hidden_size}), so deeper gates load only with width == hidden size"
        )
    if gate.top_k is not None and gate.topk_softmax:
        raise ExportError("gate.topk_softmax=true: mistral.rs refuses enable_softmax_topk; use top_k without it")
    if model.config.scaling_layer is not None:
        raise ExportError(
            f"scaling_layer={model.config.scaling_layer}: mistral.rs always runs the full scaling pass; a gate "
            "trained on a truncated scaling pass would see other hidden states"
        )


def _check_architecture(model: LoraMixModel) -> None:
    config = model.model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = _UNSUPPORTED_MODEL_TYPES.get(model_type, "it has no X-LoRA model for it")
        raise ExportError(
            f"base model_type={model_type!r}: mistral.rs 0.9.5 cannot serve it with X-LoRA ({why}); supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if getattr(config, key, False):
                raise ExportError(
                    f"base config {key}=true: mistral.rs's X-LoRA Llama loads no biases and would give other tokens"
                )
    if model_type == "gemma" and not getattr(config, "tie_word_embeddings", True):
        raise ExportError(
            "base config tie_word_embeddings=false: mistral.rs's X-LoRA Gemma uses the input embeddings as LM head"
        )
    bad = [p for p in model.layer_names if not p.startswith("model.")]
    if bad:
        raise ExportError(
            f"module '{bad[0]}' is not under 'model.': mistral.rs maps adapter tensors 'base_model.model.model.*' "
            "to its modules"
        )


def _adapter_config(info: ExpertInfo, table: dict[str, Any], targets: list[str], base_model_id: str) -> dict:
    config = dict(info.adapter_config)
    rank, scale = table["rank"], table["scale"]
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isclose(alpha / rank, scale):
        alpha = scale * rank  # the scale the mixture really uses
    dropout = config.get("lora_dropout")
    config.update(
        {
            "peft_type": config.get("peft_type", "LORA"),
            "task_type": config.get("task_type", "CAUSAL_LM"),
            "base_model_name_or_path": base_model_id,
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": float(dropout) if isinstance(dropout, (int, float)) else 0.0,
            "target_modules": targets,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    )
    return config


def xlora_config_dict(model: LoraMixModel, base_model_id: str) -> dict[str, Any]:
    """The xlora_config.json mistral.rs needs, with every key written (its defaults differ from PEFT's)."""
    return {
        **to_xlora(model.config, model.hidden_size, model.n_experts),
        "base_model_id": base_model_id,
        "adapters": model.expert_names,
        "enable_relu_and_dropout": True,  # loramix gates always put a ReLU between layers
        "xlora_dropout_p": 0.0,  # mistral.rs applies this dropout at inference
        "use_bias": model.config.gate.bias,
    }


def export_mistralrs(
    model: LoraMixModel, out_dir: str | Path, *, base_model_id: str, with_base: str | Path | None = None
) -> Path:
    """Write `model` as the flat X-LoRA directory mistral.rs 0.9.5 loads; return its path.

    base_model_id: the string mistral.rs must see in xlora_config.json, in ordering.json and as the loader's
                   `model_id` (the three must be equal): a hub id, or the directory given as `with_base`.
    with_base:     also write there a copy of the base model that mistral.rs can load (config.json with a top-level
                   rope_theta, lm_head.weight stored explicitly, the tokenizer).
    Load it with `Which.XLora(model_id=base_model_id, xlora_model_id=out_dir, order=out_dir/ordering.json, ...)`.
    Raises `ExportError` for what mistral.rs cannot represent (see docs/formats.md, "What is refused, and why").
    """
    if not isinstance(base_model_id, str) or not base_model_id.strip():
        raise ExportError(f"base_model_id={base_model_id!r} must be a non-empty string (a hub id or a directory)")
    out = Path(out_dir).expanduser()
    quantization = describe_quantization(model.model)
    if quantization is not None:
        if with_base is not None:
            raise ExportError(
                f"with_base over a {quantization['name']} base: mistral.rs reads float safetensors bases only; load "
                "the checkpoint with quantize='none' (CLI: export loads it so) to write the unquantized base"
            )
        logger.warning(
            "the mixture runs over a %s base; mistral.rs will load base_model_id=%s unquantized (ask mistral.rs for "
            "its own in-situ quantization, e.g. in_situ_quant='Q8_0')",
            quantization["name"],
            base_model_id,
        )
    if with_base is not None:
        base_path = Path(with_base).expanduser().absolute()
        if base_path == out.absolute():
            raise ExportError(f"with_base={with_base}: the base must go to another directory than the X-LoRA files")
        if model.base_reference and base_path.resolve() == Path(model.base_reference).expanduser().resolve():
            raise ExportError(
                f"with_base={with_base} is the directory the base model was loaded from; write the copy elsewhere"
            )
    # both output directories before any other work: never replace what loramix did not write
    check_replaceable(out, marker=XLORA_CONFIG, owned=_XLORA_FILES, what="--out")
    if with_base is not None:
        check_replaceable(with_base, marker="config.json", what="--with-base")
    names = model.expert_names
    _check_names(names)
    _check_lm_head(model)
    _check_architecture(model)
    _check_gate(model)
    tables = _expert_tables(model)
    adapted = set(tables[0]["modules"])
    targets = _target_names(model, adapted)
    if with_base is not None:
        write_base(model, with_base)
    ordering = {
        "base_model_id": base_model_id,
        "order": names,
        "layers": {path: i for i, path in enumerate(model.layer_names)},
    }
    stacked = model.stacked_experts()
    per_expert = unstack_experts(stacked, model.n_experts)
    with atomic_directory(out, marker=XLORA_CONFIG, owned=_XLORA_FILES, what="--out") as tmp:
        for info, table, tensors in zip(model.experts, tables, per_expert):
            config_name, weights_name = _expert_files(info.name)
            save_tensors(tensors, tmp / weights_name, {"format": "pt"})
            write_json(tmp / config_name, _adapter_config(info, table, targets, base_model_id))
        save_tensors(dict(model.gate.state_dict()), tmp / CLASSIFIER, {"format": "pt"})
        write_json(tmp / ORDERING, ordering)
        write_json(tmp / XLORA_CONFIG, xlora_config_dict(model, base_model_id))
    logger.info("exported %d experts over %d modules to %s for mistral.rs", len(names), model.n_layers, out)
    return out


def _tokenizer_decoder_ok(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(
        isinstance(d, dict) and d.get("type") == "ByteFallback" for d in decoder.get("decoders", [])
    )


def write_base(model: LoraMixModel, path: str | Path) -> Path:
    """A copy of the base model that mistral.rs loads: config.json (+ top-level rope_theta), model.safetensors with
    lm_head.weight stored even when tied, generation_config.json and the tokenizer files (tokenizer.json needed)."""
    target = Path(path).expanduser()
    # No legacy names: a directory with a config.json but no manifest is some model the user keeps, never ours.
    with atomic_directory(target, marker="config.json", what="--with-base") as tmp, model.plain_model() as base:
        state = base.state_dict()
        if "lm_head.weight" not in state:
            output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
            if output is None or getattr(output, "weight", None) is None:
                raise ExportError(f"{type(base).__name__} has no output embeddings to store as lm_head.weight")
            state["lm_head.weight"] = output.weight
        save_tensors(dict(state), tmp / BASE_WEIGHTS, {"format": "pt"})
        base.config.save_pretrained(str(tmp))
        config = read_json(tmp / "config.json", "the base config")
        rope = config.get("rope_parameters")
        for key in ("rope_theta", "partial_rotary_factor"):  # transformers 5 keeps them in rope_parameters only
            if key not in config and isinstance(rope, dict) and key in rope:
                config[key] = rope[key]
        write_json(tmp / "config.json", config)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(str(tmp))
        _write_tokenizer(model, tmp)
    return target


def _write_tokenizer(model: LoraMixModel, directory: Path) -> None:
    if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(str(directory))
    elif model.base_reference and Path(model.base_reference).is_dir():
        for name in _TOKENIZER_FILES:
            source = Path(model.base_reference) / name
            if source.is_file():
                shutil.copyfile(source, directory / name)
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(
            "with_base: the model has no fast tokenizer (tokenizer.json) to copy; mistral.rs needs one. Build the "
            "model with tokenizer=... or from a base directory that has tokenizer.json"
        )
    decoder = json.loads(tokenizer_json.read_text()).get("decoder")
    if not _tokenizer_decoder_ok(decoder):
        kind = decoder.get("type") if isinstance(decoder, dict) else decoder
        raise ExportError(
            f"with_base: tokenizer.json has decoder {kind!r}; mistral.rs 0.9.5 needs a ByteLevel decoder (or a "
            "Sequence with ByteFallback) and fails with 'can't determine decoder type' otherwise"
        )


# ---------------------------------------------------------------------- import


_GATE_KEY = re.compile(r"(?:.*\.)?(?:(inner|layers)\.(\d+)|(last))\.(weight|bias)")


def _gate_state(tensors: Mapping[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Classifier tensors of any X-LoRA writer -> loramix `ScalingHead` names, and the gate depth.

    mistral.rs / loramix: inner.{i}.*, last.*;  original xlora: inner.{j}.* (j counts ReLU/Dropout too), last.*;
    PEFT: [internal_xlora_classifier.]layers.{j}.* with the last Linear being the output layer.
    """
    linears: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    groups = set()
    for key, tensor in tensors.items():
        match = _GATE_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(
                f"{where}: unexpected tensor '{key}'; expected inner.{{i}}.weight/bias and last.weight/bias"
            )
        group, index, last, param = match.groups()
        groups.add(last or group)
        slot = (1, 0) if last else (0, int(index))
        if param in linears.setdefault(slot, {}):
            raise CheckpointError(f"{where}: tensor '{key}' appears twice (under different prefixes)")
        linears[slot][param] = tensor
    if not linears:
        raise CheckpointError(f"{where}: no classifier tensors (expected last.weight)")
    if len(groups) > 2 or groups == {"inner", "layers"} or groups == {"layers", "last"}:
        raise CheckpointError(
            f"{where}: classifier tensor names mix {sorted(groups)}; expected inner.N + last, or layers.N"
        )
    if (1, 0) not in linears:  # PEFT names: the highest index is the output layer
        linears[(1, 0)] = linears.pop(max(linears))
    for slot, params in linears.items():
        if "weight" not in params:
            raise CheckpointError(f"{where}: a classifier layer has a bias but no weight (slot {slot[1]})")
    order = sorted(linears)
    state: dict[str, torch.Tensor] = {}
    for i, slot in enumerate(order[:-1]):
        for param, tensor in linears[slot].items():
            state[f"inner.{i}.{param}"] = tensor
    for param, tensor in linears[(1, 0)].items():
        state[f"last.{param}"] = tensor
    return state, len(order)


def _number(conf: Mapping[str, Any], key: str, default: float | None, where: Path) -> Any:
    value = conf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: field '{key}'={value!r} must be a number")
    return value


def _flag(conf: Mapping[str, Any], key: str, default: bool | None, where: Path) -> bool | None:
    value = conf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: field '{key}'={value!r} must be true or false")
    return value


def _mix_config(conf: Mapping[str, Any], gate_state: Mapping[str, torch.Tensor], depth: int, where: Path) -> MixConfig:
    if conf.get("use_mean_pool"):
        raise CheckpointError(f"{where}: use_mean_pool=true pools the whole sequence; loramix gates are per token")
    if _flag(conf, "enable_softmax_topk", False, where) and conf.get("top_k_lora") is None:
        raise CheckpointError(f"{where}: enable_softmax_topk=true needs top_k_lora")
    conf_depth = int(_number(conf, "xlora_depth", 1, where))
    if conf_depth != depth:
        raise CheckpointError(
            f"{where}: xlora_depth={conf_depth} but the classifier file holds {depth} linear layer(s)"
        )
    if depth > 1 and not _flag(conf, "enable_relu_and_dropout", False, where):
        raise CheckpointError(
            f"{where}: xlora_depth={depth} without enable_relu_and_dropout=true stacks linear layers with no "
            "activation; loramix gates always put a ReLU between layers"
        )
    width = int(gate_state["inner.0.weight"].shape[0]) if depth > 1 else None
    size = conf.get("xlora_size")
    if depth > 1 and size is not None and size != width:
        raise CheckpointError(f"{where}: xlora_size={size} but the classifier's inner.0.weight has {width} rows")
    values = {name: conf.get(name) for name in XLORA_NAMES.values()}
    for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
        values[name] = _flag(conf, name, None, where)
    for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
        values[name] = _number(conf, name, None, where)
    dropout = float(_number(conf, "xlora_dropout_p", 0.0, where))
    values["xlora_dropout_p"] = dropout if 0.0 <= dropout < 1.0 else 0.0  # inference only; X-LoRA's default is 0
    values["xlora_depth"] = depth
    try:
        return from_xlora(values, width=width, bias="last.bias" in gate_state)
    except LoramixError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _adapter_names(conf: Mapping[str, Any], where: Path) -> list[str]:
    adapters = conf.get("adapters")
    if isinstance(adapters, Mapping):
        names = [str(k) for k in adapters]
    elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
        names = list(adapters)
    else:
        raise CheckpointError(f"{where}: field 'adapters' must be a list of adapter names or a name -> id mapping")
    if not names:
        raise CheckpointError(f"{where}: field 'adapters' is empty")
    return names


def _read_ordering(path: Path, names: list[str]) -> tuple[list[str], dict[str, int] | None]:
    ordering = read_json(path, "the X-LoRA ordering file")
    order = ordering.get("order")
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or not order:
        raise CheckpointError(f"{path}: field 'order' must be a non-empty list of adapter names")
    if sorted(order) != sorted(names):
        raise CheckpointError(f"{path}: order {order} names other adapters than xlora_config.json ({names})")
    layers = ordering.get("layers")
    if layers is not None and (
        not isinstance(layers, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers.values())
    ):
        raise CheckpointError(f"{path}: field 'layers' must map module paths to integer indices")
    return order, layers


def _find_flat_file(root: Path, name: str, suffix: str, all_names: list[str]) -> Path:
    exact = root / (name + suffix)
    if exact.is_file():
        return exact
    ext = suffix.rsplit(".", 1)[1]
    found = []
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name in (XLORA_CONFIG, CLASSIFIER, ORDERING) or name not in p.name:
            continue
        if p.suffix == "." + ext and (ext == "safetensors" or "adapter_config" in p.name):
            found.append(p)
    found = [p for p in found if not any(n != name and len(n) > len(name) and n in p.name for n in all_names)]
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({[p.name for p in found]})"
        raise CheckpointError(f"{root}: {what} for adapter '{name}'; expected {name}{suffix}")
    return found[0]


def _read_expert(name: str, config_path: Path, weights_path: Path) -> Any:
    config = read_json(config_path, f"the config of adapter '{name}'", error=AdapterError, prefix=f"expert '{name}': ")
    check_adapter_config(config, name, str(config_path))
    weights = read_tensors(weights_path, f"the weights of adapter '{name}'")
    return expert_from_state_dict(name, str(weights_path), config, weights)


def import_xlora(
    path: str | Path,
    base: Any,
    *,
    dtype: torch.dtype | str | None = None,
    order: str | Path | None = None,
    device: str | torch.device | None = None,
) -> LoraMixModel:
    """Read an X-LoRA directory into a `LoraMixModel` (experts, gate weights and every option).

    Layouts: flat (mistral.rs; what `export_mistralrs` writes: NAME.adapter_config.json / NAME.adapter_model.safetensors
    at the top, expert order from `order` or ./ordering.json, else xlora_config.json's `adapters`), or the original
    X-LoRA layout (one sub-folder per adapter named after it, order of xlora_config.json's `adapters`).
    base: a model id, directory or loaded `PreTrainedModel` (the directory's base_model_id is not fetched).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (expected an X-LoRA directory with {XLORA_CONFIG})")
    config_path = root / XLORA_CONFIG
    conf = read_json(config_path, "the X-LoRA config")
    names = _adapter_names(conf, config_path)
    layer_index: dict[str, int] | None = None
    ordering_path = Path(order).expanduser() if order is not None else root / ORDERING
    if order is not None or ordering_path.is_file():
        names, layer_index = _read_ordering(ordering_path, names)

    experts = []
    for name in names:
        sub = root / name
        if (sub / "adapter_config.json").is_file():  # the original layout
            config_file, weights_file = sub / "adapter_config.json", sub / "adapter_model.safetensors"
        elif name == "default" and (root / "adapter_config.json").is_file():  # PEFT saves "default" at the top
            config_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
        else:
            config_file = _find_flat_file(root, name, ADAPTER_CONFIG_SUFFIX, names)
            weights_file = _find_flat_file(root, name, ADAPTER_WEIGHTS_SUFFIX, names)
        experts.append(_read_expert(name, config_file, weights_file))

    classifier_path = root / CLASSIFIER
    gate_state, depth = _gate_state(read_tensors(classifier_path, "the X-LoRA classifier"), classifier_path)
    config = _mix_config(conf, gate_state, depth, config_path)

    model, reference = load_base_model(base, dtype=dtype, device=device)
    tokenizer = load_tokenizer(base) if isinstance(base, (str, Path)) else None
    stacked = stack_experts(experts, model)
    infos = [ExpertInfo(e.name, e.adapter_config, e.source) for e in experts]
    mix = LoraMixModel(model, stacked, infos, config, tokenizer=tokenizer, base_reference=reference)
    if layer_index is not None:
        expected = {p: i for i, p in enumerate(mix.layer_names)}
        if layer_index != expected:
            wrong = sorted(set(layer_index.items()) ^ set(expected.items()))[0][0]
            raise CheckpointError(
                f"{ordering_path}: field 'layers' does not give the adapted modules in the base model's "
                f"named_modules() order 0..{len(expected) - 1} (first difference at '{wrong}')"
            )
    load_gate_state(mix, gate_state, classifier_path)
    return mix


