"""The frozen base model, as loramix meets it in transformers: loading one from an id, a directory or memory (with
the checks that make a bad path, a missing device or an offline hub fail in one line), its text config, its
tokenizer, and the pair of KV caches that generation keeps (one per pass).

Nothing here knows about experts or gates: model.py, generate.py, decode.py and checkpoint.py build on it.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, LoramixError
from .quant import quantization_config, quiet_backend_noise, release_checkpoint_map

logger = logging.getLogger(__name__)
quiet_backend_noise()  # before transformers imports torchao (it does whenever torchao is installed)

__all__ = [
    "DTYPES",
    "GenerationDefaults",
    "LoraMixCache",
    "check_device",
    "load_base_model",
    "load_tokenizer",
    "new_dynamic_cache",
    "resolve_defaults",
    "text_config",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""The dtype names the command line and the lm-eval model accept (`--dtype`, `dtype=`)."""


@dataclass
class LoraMixCache:
    """The two KV caches of generation: one per pass (they see different hidden states, so one cache is wrong).

    Either may be a transformers `DynamicCache` (eager generation) or `StaticCache` (the decode engine). `scaling` is
    None where no scaling pass runs after the prompt (prompt and fixed modes). `gate` is the gate's own memory of the
    earlier tokens (a `gate.GateCache`) when the gate reads context (`GateConfig.context`), else None.
    """

    scaling: Any | None  # transformers Cache of the scaling pass
    mixed: Any  # transformers Cache of the mixed pass
    gate: Any | None = None  # gate.GateCache of a context gate


def text_config(model: nn.Module) -> Any:
    """The config of the language model inside `model` (multimodal configs hold it as their text config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def new_dynamic_cache(config: Any) -> Any:
    """An empty transformers `DynamicCache` for a model with this (text) config."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)  # sliding-window / hybrid layouts where the model has them
    except TypeError:
        return DynamicCache()


def _ids_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


@dataclass(frozen=True)
class GenerationDefaults:
    """The generation settings that come from the model when the caller leaves them out (`resolve_defaults`).

    eos_token_ids: the ids that end a row ([] when the model names none: rows run to max_new_tokens).
    pad_token_id:  what fills a row after it stopped, and the left padding of batched prompts.
    context:       the model's maximum number of positions, or None if its config does not say.
    """

    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    context: int | None


_TOLD_EOS: weakref.WeakSet = weakref.WeakSet()
"""Models whose EOS came from their tokenizer, already said (the notice is given once per model)."""


def resolve_defaults(
    model: Any,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
) -> GenerationDefaults:
    """The one resolution of eos, pad and context (of a LoraMixModel: `model.model` is its transformers model),
    used by `generate`, the server, the CLI, the harness and the analysis.

    eos: the argument; else the model's generation config, else its config, else the tokenizer's (as vLLM does; a
    one-line notice says so, once per model). `[]` disables stopping on EOS.
    pad: the argument; else the generation config, the config, the tokenizer's pad token, the first eos id, 0.
    tokenizer: the one to read (default: the model's).
    Nothing is written to the tokenizer or the model.
    """
    config = text_config(model.model)
    gen_config = getattr(model.model, "generation_config", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    eos = _ids_list(eos_token_id)
    if eos_token_id is None:
        eos = _ids_list(getattr(gen_config, "eos_token_id", None) or getattr(config, "eos_token_id", None))
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = _ids_list(tokenizer.eos_token_id)
            if model not in _TOLD_EOS:
                _TOLD_EOS.add(model)
                logger.warning(
                    "the model's configs name no EOS token: ending rows on the tokenizer's, %r (id %d)",
                    tokenizer.eos_token,
                    eos[0],
                )
    if pad_token_id is None:
        for candidate in (
            getattr(gen_config, "pad_token_id", None),
            getattr(config, "pad_token_id", None),
            getattr(tokenizer, "pad_token_id", None),
            eos[0] if eos else None,
            0,
        ):
            if isinstance(candidate, int):
                pad_token_id = candidate
                break
    context = getattr(config, "max_position_embeddings", None)
    return GenerationDefaults(tuple(eos), int(pad_token_id), context if isinstance(context, int) else None)


def _hf_dtype_kwargs(dtype: torch.dtype | str | None) -> dict[str, Any]:
    if dtype is None:
        return {}
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_base_model(
    base: Any,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: Any = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, str | None]:
    """A transformers causal LM from an id/path (or as given), and the reference to record in checkpoints.

    quantize: "int8", "int4", "nf4" or a transformers quantization config (see quant.py); the same as passing
    `quantization_config=` through `model_kwargs`. Only for a base loaded from an id or a directory.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    device = check_device(device)
    if quantize is not None:
        if model_kwargs.get("quantization_config") is not None:
            raise ConfigError("give either quantize= or quantization_config=, not both")
        compute = dtype if isinstance(dtype, torch.dtype) else None
        model_kwargs["quantization_config"] = quantization_config(quantize, compute)
    quantized = model_kwargs.get("quantization_config") is not None
    if quantized and device is not None:
        model_kwargs.setdefault("device_map", {"": str(device)})  # quantized weights are placed while loading
    if isinstance(base, PreTrainedModel):
        if quantized:
            raise ConfigError(
                "quantize / quantization_config apply when the base is loaded from an id or a directory; "
                "quantize the PreTrainedModel you pass yourself (transformers' from_pretrained(quantization_config=))"
            )
        model = base
        if dtype is not None:
            model = model.to(dtype)
        reference = getattr(model.config, "_name_or_path", None) or None
    elif isinstance(base, (str, Path)):
        reference = str(base)
        local = _local_base_dir(reference)
        offline = local is None and _hub_offline()
        if offline:
            model_kwargs = {"local_files_only": True, **model_kwargs}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(local or reference), **_hf_dtype_kwargs(dtype), **model_kwargs
            )
        except (OSError, ValueError, KeyError) as exc:
            if offline:
                raise LoramixError(
                    f"base model '{reference}' is a hub id that is not in the local Hugging Face cache, and "
                    "HF_HUB_OFFLINE is set; pass a local directory of the base instead (--base DIR, or "
                    "load(..., base=DIR))"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoramixError(f"cannot load base model '{reference}': {first}") from None
        if local is not None:
            reference = str(local.resolve())
    else:
        raise ConfigError(
            f"base must be a model id, a directory or a transformers PreTrainedModel, got {type(base).__name__}"
        )
    if quantized:
        release_checkpoint_map(model)
    elif device is not None:
        model = model.to(device)
    model.eval()
    return model, reference


def check_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a torch.device, or a `ConfigError` saying why this machine cannot use it (before any loading)."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device name; expected e.g. cpu, cuda or cuda:1") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device!r}: this machine has no CUDA device (or torch was built without CUDA)")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device={device!r}: this machine has {count} CUDA device(s), numbered from 0")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r}: MPS is not available on this machine")
    return resolved


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _local_base_dir(reference: str) -> Path | None:
    """The directory `reference` names, None when it reads as a hub id ("name" or "org/name" that is not on disk).

    Raises `ConfigError` for a path that cannot be a base: a file, or a missing directory written as a path.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"base model {reference}: is a file; expected a model directory (config.json + weights)")
    looks_like_path = (
        path.is_absolute()
        or reference.startswith((".", "~"))
        or reference.count("/") > 1
        or "\\" in reference
        or (path.parent != Path(".") and path.parent.is_dir())
    )
    if looks_like_path:
        raise ConfigError(f"base model {reference}: no such directory; expected a model directory or a hub id")
    return None


def load_tokenizer(source: Any) -> Any:
    """The tokenizer stored at `source` (an id or directory), or None if there is none."""
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # tokenizers are optional for the library: tensors in, tensors out
        logger.info("no tokenizer loaded from %s: %s", source, str(exc).splitlines()[0] if str(exc) else exc)
        return None
