"""Generation with two KV caches (one per pass), streaming, and speed modes.

Every decode step, for the new token x_t:
    scaling pass:  backbone(x_t, cache_1) -> h_t          (cache_1 holds the scaling pass's keys/values)
    gate:          s_t = gate(h_t)                         [B, 1, L, N]
    mixed pass:    model(x_t, cache_2, scalings=s_t)      (cache_2 holds the mixed pass's keys/values)
This equals recomputing the whole prefix through both passes (tests check it token for token). One shared cache
would be wrong: the two passes see different hidden states.

Modes (recorded in the output):
    granular   scalings for every token; both passes every step (the method as published).
    prompt     scalings computed per token on the prompt; every generated token reuses the scalings of the LAST
               prompt token, so a decode step is one mixed pass and nothing else.
    truncated  granular, with the scaling pass stopped after `config.scaling_layer` blocks. The gate must have been
               trained for that k: the mode needs a model whose config records it.
    fixed      (when `scalings=` is given) one mixture for every token, prompt included; no scaling pass at all.
               Used for baselines: single experts, uniform merge, a per-prompt router.
Sampling reuses transformers' logits processors and stopping criteria.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .model import LoraMixModel

logger = logging.getLogger(__name__)

__all__ = ["MODES", "GenerationOutput", "IncrementalDecoder", "encode_prompts", "generate", "render_chat", "stream"]

MODES = ("granular", "prompt", "truncated")


@dataclass
class GenerationOutput:
    """Result of `generate`.

    sequences:  [B, T + n] the prompt (as given, padding included) followed by the generated tokens; rows that
                stopped early are filled with `pad_token_id`.
    scalings:   [B, n, L, N] (with return_scalings): the scalings of the forward step that produced each generated
                token, i.e. those of the position just before it (the last prompt token for the first one).
    logits:     [B, n, V] (with output_logits): the raw logits of each step, before any processing.
    lengths:    per row, the generated tokens up to and including the one that stopped it (the rest is padding).
    """

    sequences: torch.Tensor
    prompt_length: int
    mode: str
    scaling_layer: int | None
    finish_reasons: list[str]
    scalings: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def new_tokens(self) -> torch.Tensor:
        """[B, n] the generated tokens only."""
        return self.sequences[:, self.prompt_length :]


def _text_config(model: LoraMixModel) -> Any:
    config = model.model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _new_dynamic_cache(config: Any) -> Any:
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


def _logits_processors(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _check_args(
    model: LoraMixModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    mode: str,
    scaling_layer: int | None,
) -> int:
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.long, torch.int)
    ):
        raise ConfigError("input_ids must be an integer tensor of shape [batch, tokens]")
    if input_ids.shape[1] == 0:
        raise ConfigError("input_ids is empty: the prompt needs at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 disables top-k sampling)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={repetition_penalty} must be > 0")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    trained_k = model.config.scaling_layer
    if scaling_layer is not None and scaling_layer != trained_k:
        raise ConfigError(
            f"scaling_layer={scaling_layer} but this gate was trained with scaling_layer={trained_k}; a gate only "
            "works with the scaling-pass depth it was trained for (train one with --scaling-layer)"
        )
    if mode == "truncated" and trained_k is None:
        raise ConfigError(
            "mode 'truncated' needs a gate trained on a truncated scaling pass (config.scaling_layer is unset); "
            "train one with `loramix train-gate --scaling-layer k`"
        )
    context = getattr(_text_config(model), "max_position_embeddings", None)
    prompt_length = input_ids.shape[1]
    if context is not None and prompt_length > context:
        raise ConfigError(f"the prompt has {prompt_length} tokens; the model's context is {context} tokens")
    if context is not None and prompt_length + max_new_tokens > context:
        logger.warning(
            "max_new_tokens=%d exceeds the context (%d - %d prompt tokens): generating at most %d",
            max_new_tokens,
            context,
            prompt_length,
            context - prompt_length,
        )
        max_new_tokens = context - prompt_length
    return max_new_tokens


def _fixed_scalings(scalings: torch.Tensor, batch: int, n_layers: int, n_experts: int) -> torch.Tensor:
    """[L, N], [B, L, N] or [B, 1, L, N] -> [B, 1, L, N]."""
    s = scalings
    if s.dim() == 2:
        s = s.unsqueeze(0)
    if s.dim() == 3:
        s = s.unsqueeze(1)
    if s.dim() != 4 or s.shape[1] != 1 or s.shape[-2:] != (n_layers, n_experts) or s.shape[0] not in (1, batch):
        raise ConfigError(
            f"scalings of shape {tuple(scalings.shape)}: expected [{n_layers}, {n_experts}], "
            f"[batch, {n_layers}, {n_experts}] or [batch, 1, {n_layers}, {n_experts}]"
        )
    if not bool(torch.isfinite(s).all()):
        raise ConfigError("scalings contain NaN or infinite values")
    return s.expand(batch, 1, n_layers, n_experts)


class _Run:
    """One generation: the decode loop as an iterator of steps (so that `stream` can yield between steps)."""

    def __init__(self, model: LoraMixModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kw: Any):
        self.model = model
        self.kw = kw
        device = model.device
        self.input_ids = input_ids.to(device)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.mask = mask.to(device=device, dtype=torch.long)
        if self.mask.shape != self.input_ids.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(self.mask.shape)}; expected {tuple(self.input_ids.shape)}"
            )
        if bool((self.mask.sum(-1) == 0).any()):
            raise ConfigError("a row of attention_mask is all zeros: every prompt needs at least one token")

    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (logits [B, V], scalings [B, L, N]) for each position to predict from; the caller appends the
        chosen token to `full_ids` (and mask, positions) between steps."""
        kw = self.kw
        model = self.model
        mode, fixed, use_cache = kw["mode"], kw["fixed"], kw["use_cache"]
        ids, mask = self.input_ids, self.mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        if use_cache:
            cache_s = _new_dynamic_cache(_text_config(model)) if fixed is None and mode != "prompt" else None
            cache_m = _new_dynamic_cache(_text_config(model))
        hold: torch.Tensor | None = fixed  # scalings held for every later token (prompt / fixed modes)
        held = None
        step_input, step_pos = ids, positions
        while True:
            if not use_cache:  # reference path: recompute the whole prefix through both passes
                ids_now, pos_now = self.full_ids, self.full_positions
                if hold is not None and mode == "prompt":
                    prompt_s = self.prompt_scalings
                    extra = ids_now.shape[1] - prompt_s.shape[1]
                    s = torch.cat([prompt_s, hold.expand(-1, extra, -1, -1)], 1) if extra else prompt_s
                elif hold is not None:
                    s = hold.expand(-1, ids_now.shape[1], -1, -1)
                else:
                    s = model.compute_scalings(ids_now, self.full_mask, pos_now)
                    if mode == "prompt":
                        self.prompt_scalings = s
                        hold = s[:, -1:]
                with torch.no_grad():
                    out = model(ids_now, attention_mask=self.full_mask, position_ids=pos_now, scalings=s)
                yield out.logits[:, -1], s[:, -1]
                continue
            if hold is not None:
                if held is None:  # rank multipliers of the held mixture, computed once for every later step
                    held = model.prepare_scalings(hold)
                s, mix_with = hold, held
            else:
                s = model.compute_scalings(
                    step_input, self.full_mask, step_pos, past_key_values=cache_s, use_cache=cache_s is not None
                )
                mix_with = s
                if mode == "prompt":
                    hold = s[:, -1:]
            with torch.no_grad():
                out = model(
                    step_input,
                    attention_mask=self.full_mask,
                    position_ids=step_pos,
                    scalings=mix_with,
                    past_key_values=_Pair(cache_s, cache_m),
                    use_cache=True,
                )
            yield out.logits[:, -1], s[:, -1]
            step_input = self.full_ids[:, -1:]
            step_pos = self.full_positions[:, -1:]

    # the growing sequence, updated by the caller between steps
    full_ids: torch.Tensor
    full_mask: torch.Tensor
    full_positions: torch.Tensor


class _Pair:
    """A LoraMixCache look-alike that lets one of the two caches be absent."""

    def __init__(self, scaling: Any, mixed: Any) -> None:
        self.scaling, self.mixed = scaling, mixed


def _iterate(
    model: LoraMixModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    mode: str = "granular",
    scalings: torch.Tensor | None = None,
    scaling_layer: int | None = None,
    streamer: Any = None,
) -> Iterator[dict[str, Any]]:
    """The decode loop. Yields one dict per generated token, then a final dict with `done=True`."""
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    max_new_tokens = _check_args(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, mode, scaling_layer
    )
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    config = _text_config(model)
    gen_config = getattr(model.model, "generation_config", None)
    eos = _ids_list(eos_token_id)
    if eos_token_id is None:
        eos = _ids_list(getattr(gen_config, "eos_token_id", None) or getattr(config, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if do_sample and temperature == 0:
        do_sample = False  # temperature 0 means greedy, as in the OpenAI API
    processors = _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
    stops = StoppingCriteriaList()
    if stop_strings:
        if tokenizer is None:
            raise ConfigError("stop_strings need a tokenizer (pass tokenizer=... or load a checkpoint that has one)")
        stops.append(StopStringCriteria(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings))
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))

    fixed = None
    if scalings is not None:
        fixed = _fixed_scalings(
            scalings.to(model.device, model.dtype), input_ids.shape[0], model.n_layers, model.n_experts
        )
    run = _Run(
        model, input_ids, attention_mask, mode=mode if fixed is None else "fixed", fixed=fixed, use_cache=use_cache
    )
    run.full_ids, run.full_mask = run.input_ids, run.mask
    run.full_positions = (run.mask.cumsum(-1) - 1).clamp_min(0)
    batch = run.input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    reasons = ["length"] * batch
    lengths = torch.zeros(batch, dtype=torch.long, device=model.device)
    eos_tensor = torch.tensor(eos, device=model.device) if eos else None
    if streamer is not None:
        streamer.put(run.input_ids.cpu())

    steps = run.steps() if max_new_tokens > 0 else iter(())
    for index, (logits, step_scalings) in enumerate(steps):
        scores = processors(run.full_ids, logits.float())
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        lengths += (~finished).long()
        run.full_ids = torch.cat([run.full_ids, token[:, None]], 1)
        run.full_mask = torch.cat([run.full_mask, (~finished).long()[:, None]], 1)
        run.full_positions = torch.cat([run.full_positions, run.full_positions[:, -1:] + 1], 1)
        if streamer is not None:
            streamer.put(token.cpu())
        newly = torch.zeros_like(finished)
        if eos_tensor is not None:
            newly |= torch.isin(token, eos_tensor)
        if len(stops):
            newly |= stops(run.full_ids, scores).to(finished.device)
        for row in (newly & ~finished).nonzero().flatten().tolist():
            reasons[row] = "stop"
        finished |= newly
        yield {"token": token, "logits": logits, "scalings": step_scalings, "finished": finished.clone(), "done": False}
        if bool(finished.all()) or index + 1 >= max_new_tokens:
            break
    if streamer is not None:
        streamer.end()
    yield {
        "done": True,
        "sequences": run.full_ids,
        "prompt_length": input_ids.shape[1],
        "mode": "fixed" if fixed is not None else mode,
        "finish_reasons": reasons,
        "lengths": lengths.tolist(),
    }


@torch.no_grad()
def generate(
    model: LoraMixModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    return_scalings: bool = False,
    output_logits: bool = False,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate from a batch of (left-padded) prompts. Arguments as in transformers' `generate`:

    max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, eos_token_id, pad_token_id,
    stop_strings (+ tokenizer), seed or generator, use_cache (default True), streamer (a transformers streamer),
    plus `mode` ("granular", "prompt", "truncated"), `scalings` (fixed mixture, see module docstring),
    `scaling_layer` (checked against the gate's), `return_scalings` and `output_logits`.
    """
    import time

    start = time.perf_counter()
    step_scalings, step_logits = [], []
    first_token_at = None
    final: dict[str, Any] = {}
    for item in _iterate(model, input_ids, attention_mask, **kwargs):
        if item["done"]:
            final = item
            break
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if return_scalings:
            step_scalings.append(item["scalings"])
        if output_logits:
            step_logits.append(item["logits"])
    elapsed = time.perf_counter() - start
    n_new = final["sequences"].shape[1] - final["prompt_length"]
    return GenerationOutput(
        sequences=final["sequences"],
        prompt_length=final["prompt_length"],
        mode=final["mode"],
        scaling_layer=model.config.scaling_layer,
        finish_reasons=final["finish_reasons"],
        lengths=final["lengths"],
        scalings=torch.stack(step_scalings, 1) if step_scalings else None,
        logits=torch.stack(step_logits, 1) if step_logits else None,
        timings={
            "seconds": elapsed,
            "time_to_first_token": (first_token_at - start) if first_token_at else elapsed,
            "new_tokens": n_new,
        },
    )


class IncrementalDecoder:
    """Turn a growing list of token ids into text pieces as soon as they are stable (token by token).

    Decodes a small window (from `prefix` to the end) and emits what it adds to the text of the window up to `read`,
    unless it ends in an incomplete UTF-8 sequence. Works for byte-level BPE, SentencePiece and character tokenizers.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete sequence decodes to replacement characters)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


@torch.no_grad()
def stream(
    model: LoraMixModel,
    prompt: str | torch.Tensor,
    *,
    tokenizer: Any = None,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the generated text piece by piece (one prompt). Takes the arguments of `generate`."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ConfigError("streaming text needs a tokenizer (pass tokenizer=... or load a checkpoint that has one)")
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        input_ids = prompt if prompt.dim() == 2 else prompt[None]
    if input_ids.shape[0] != 1:
        raise ConfigError("stream() takes one prompt; use generate() for batches")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    for item in _iterate(model, input_ids, tokenizer=tokenizer, **kwargs):
        if item["done"]:
            break
        if bool(item["finished"][0]) and int(item["token"][0]) in _eos_of(model, kwargs):
            continue  # the end-of-sequence token itself is not text
        piece = decoder.push(int(item["token"][0]))
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def _eos_of(model: LoraMixModel, kwargs: dict[str, Any]) -> list[int]:
    if kwargs.get("eos_token_id") is not None:
        return _ids_list(kwargs["eos_token_id"])
    gen_config = getattr(model.model, "generation_config", None)
    return _ids_list(getattr(gen_config, "eos_token_id", None) or getattr(_text_config(model), "eos_token_id", None))


# ---------------------------------------------------------------------- text helpers (CLI, server)

PLAIN_CHAT_FORMAT = "{role}: {content}\n"
"""Used for chat messages when the tokenizer has no chat template: one line per message, then 'assistant:'."""


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for chat messages: the tokenizer's chat template, or the documented plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    text = "".join(PLAIN_CHAT_FORMAT.format(role=m["role"], content=m["content"]) for m in messages)
    return text + "assistant:"


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], *, templated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts into a left-padded batch: (input_ids [B, T], attention_mask [B, T]).

    templated: the texts come from a chat template that already holds the special tokens (no BOS added again).
    """
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: pass token ids, or a checkpoint saved with its tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    if enc.input_ids.shape[1] == 0 or bool((enc.attention_mask.sum(-1) == 0).any()):
        raise ConfigError("a prompt is empty after tokenization")
    return enc.input_ids, enc.attention_mask


def dominant_experts(scalings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scalings [..., L, N] -> (index [...], share [...]) of the expert with the largest mean scaling over layers."""
    mean = scalings.float().mean(-2)
    share, index = mean.max(-1)
    return index, share
