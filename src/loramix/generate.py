"""Generation with two KV caches (one per pass), streaming, and speed modes.

Every decode step, for the new token x_t:
    scaling pass:  backbone(x_t, cache_1) -> h_t          (cache_1 holds the scaling pass's keys/values)
    gate:          s_t = gate(h_t)                         [B, 1, L, N]  (a context gate: gate(h_t, cache_3))
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

from .base import LoraMixCache, new_dynamic_cache, text_config
from .errors import ConfigError
from .text import IncrementalDecoder

if TYPE_CHECKING:
    from .model import LoraMixModel

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "DecodeState",
    "Generation",
    "GenerationDefaults",
    "GenerationOutput",
    "Step",
    "generate",
    "logits_processors",
    "resolve_defaults",
    "stream",
]

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


def _ids_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def logits_processors(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    """transformers' logits processors for these settings (the server builds one list per row)."""
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
    context = getattr(text_config(model.model), "max_position_embeddings", None)
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


def resolve_defaults(
    model: LoraMixModel,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
) -> GenerationDefaults:
    """The one resolution of eos, pad and context, used by `generate`, the server, the CLI and the analysis.

    eos: the argument; else the model's generation config, else its config. `[]` disables stopping on EOS.
    pad: the argument; else the generation config, the config, the tokenizer's pad token, the first eos id, 0.
    Nothing is written to the tokenizer or the model.
    """
    config = text_config(model.model)
    gen_config = getattr(model.model, "generation_config", None)
    eos = _ids_list(eos_token_id)
    if eos_token_id is None:
        eos = _ids_list(getattr(gen_config, "eos_token_id", None) or getattr(config, "eos_token_id", None))
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


@dataclass
class Step:
    """One generated token for every row of the batch (what a `Generation` yields).

    token:    [B] the chosen tokens (`pad_token_id` for rows that had already stopped)
    logits:   [B, V] the raw logits they were chosen from
    scalings: [B, L, N] the scalings of the forward step that produced them
    finished: [B] bool, rows stopped by this token or before
    """

    index: int
    token: torch.Tensor
    logits: torch.Tensor
    scalings: torch.Tensor
    finished: torch.Tensor


@dataclass
class DecodeState:
    """The growing batch of one generation, preallocated for its C = prompt + new tokens (or cache slots) columns.

    sequences [B, C], mask [B, C], positions [B, C]: filled up to `length` (a host int: slicing by it never syncs).
    finished [B] bool, stopped [B] bool (ended by eos or a stop string), lengths [B] long (tokens generated up to
    and including the one that ended the row): kept on the device, read back every `check_every` steps.
    """

    sequences: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    length: int
    finished: torch.Tensor
    stopped: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def start(cls, input_ids: torch.Tensor, mask: torch.Tensor, columns: int, pad_token_id: int) -> DecodeState:
        batch, prompt = input_ids.shape
        device = input_ids.device
        sequences = torch.full((batch, columns), pad_token_id, dtype=input_ids.dtype, device=device)
        sequences[:, :prompt] = input_ids
        full_mask = torch.zeros(batch, columns, dtype=torch.long, device=device)
        full_mask[:, :prompt] = mask
        positions = torch.zeros(batch, columns, dtype=torch.long, device=device)
        positions[:, :prompt] = (mask.cumsum(-1) - 1).clamp_min(0)
        no = torch.zeros(batch, dtype=torch.bool, device=device)
        return cls(sequences, full_mask, positions, prompt, no, no.clone(), torch.zeros_like(no, dtype=torch.long))

    @property
    def ids(self) -> torch.Tensor:
        """[B, length] the prompt and the tokens generated so far."""
        return self.sequences[:, : self.length]

    def append(self, token: torch.Tensor) -> None:
        """Add one token per row [B] (rows already finished get it masked out, as transformers does)."""
        at = self.length
        self.sequences[:, at] = token
        self.mask[:, at] = (~self.finished).long()
        self.positions[:, at] = self.positions[:, at - 1] + 1
        self.lengths += (~self.finished).long()
        self.length = at + 1


STOP_CHECK_EVERY = 8
"""With compile=True, how many steps run between two reads of the stop flags (the only host sync of the loop)."""


class Generation:
    """A generation in progress: iterate it for one `Step` per generated token; then `output()` gives the result.

    Takes the arguments of `generate` (except return_scalings / output_logits, which `generate` collects). The
    arguments are checked and the defaults resolved when it is made (`defaults` holds them), before any forward.
    """

    def __init__(
        self,
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
        compile: Any = False,
    ) -> None:
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.model = model
        self.max_new_tokens = _check_args(
            model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, mode, scaling_layer
        )
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.defaults = resolve_defaults(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        self.do_sample = do_sample and temperature != 0  # temperature 0 means greedy, as in the OpenAI API
        self.processors = logits_processors(self.do_sample, temperature, top_k, top_p, repetition_penalty)
        self.stops = StoppingCriteriaList()
        if stop_strings:
            if tokenizer is None:
                raise ConfigError(
                    "stop_strings need a tokenizer (pass tokenizer=... or load a checkpoint that has one)"
                )
            strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
            self.stops.append(StopStringCriteria(tokenizer, strings))
        if generator is None and seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(int(seed))
        self.generator = generator
        self.streamer = streamer
        device = model.device
        ids = input_ids.to(device)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = mask.to(device=device, dtype=torch.long)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}")
        if bool((mask.sum(-1) == 0).any()):
            raise ConfigError("a row of attention_mask is all zeros: every prompt needs at least one token")
        self.fixed = None
        if scalings is not None:
            self.fixed = _fixed_scalings(
                scalings.to(device, model.dtype), ids.shape[0], model.n_layers, model.n_experts
            )
        self.mode = "fixed" if self.fixed is not None else mode
        self.use_cache = use_cache
        self.backend = _compile_backend(model, compile, use_cache)
        self.prompt_length = ids.shape[1]
        columns = self.prompt_length + self.max_new_tokens
        if self.backend is not None:
            from .decode import cache_slots

            columns = cache_slots(columns, self.defaults.context)
        self.state = DecodeState.start(ids, mask, columns, self.defaults.pad_token_id)
        self.eos = torch.tensor(self.defaults.eos_token_ids, device=device) if self.defaults.eos_token_ids else None
        self._done = False

    # ------------------------------------------------------------------ the loop

    def __iter__(self) -> Iterator[Step]:
        if self._done:
            return
        st = self.state
        if self.streamer is not None:
            self.streamer.put(st.ids.cpu())
        compiled = self.backend is not None
        check_every = STOP_CHECK_EVERY if compiled and self.streamer is None else 1
        forwards = self._engine_forwards() if compiled else self._eager_forwards()
        try:
            for index in range(self.max_new_tokens):
                logits, step_scalings = next(forwards)
                scores = self.processors(st.ids, logits.float())
                token = self._choose(scores, sync_free=compiled)
                token = torch.where(st.finished, torch.full_like(token, self.defaults.pad_token_id), token)
                st.append(token)
                if self.streamer is not None:
                    self.streamer.put(token.cpu())
                newly = torch.zeros_like(st.finished)
                if self.eos is not None:
                    newly |= torch.isin(token, self.eos)
                if len(self.stops):
                    newly |= self.stops(st.ids, scores).to(newly.device)
                st.stopped |= newly & ~st.finished
                st.finished = st.finished | newly
                yield Step(index, token, logits, step_scalings, st.finished)
                if (index + 1) % check_every == 0 and bool(st.finished.all()):
                    break
        finally:
            forwards.close()
            self._done = True
            if self.streamer is not None:
                self.streamer.end()

    def _choose(self, scores: torch.Tensor, sync_free: bool) -> torch.Tensor:
        """Greedy argmax, or a sample: `multinomial` (eager, the reference) or, without a host sync, the argmax of
        probs / Exponential(1) noise (the same distribution; other draws for the same seed)."""
        if not self.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        if sync_free:
            noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
            return (probs / noise).argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def _eager_forwards(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The reference path: (logits [B, V], scalings [B, L, N]) per position to predict from, with two growing
        `DynamicCache`s (or, with use_cache=False, recomputing the whole prefix through both passes)."""
        model, st, mode = self.model, self.state, self.mode
        hold: torch.Tensor | None = self.fixed  # scalings held for every later token (prompt / fixed modes)
        if not self.use_cache:
            prompt_scalings = None
            while True:
                ids_now, mask_now, pos_now = st.ids, st.mask[:, : st.length], st.positions[:, : st.length]
                if hold is not None and mode == "prompt":
                    extra = ids_now.shape[1] - prompt_scalings.shape[1]
                    s = torch.cat([prompt_scalings, hold.expand(-1, extra, -1, -1)], 1) if extra else prompt_scalings
                elif hold is not None:
                    s = hold.expand(-1, ids_now.shape[1], -1, -1)
                else:
                    s = model.compute_scalings(ids_now, mask_now, pos_now)
                    if mode == "prompt":
                        prompt_scalings, hold = s, s[:, -1:]
                with torch.no_grad():
                    out = model(
                        ids_now, attention_mask=mask_now, position_ids=pos_now, scalings=s, **model.last_logits_only
                    )
                yield out.logits[:, -1], s[:, -1]
        config = text_config(model.model)
        granular = self.fixed is None and mode != "prompt"  # a scaling pass after the prompt
        cache = LoraMixCache(
            scaling=new_dynamic_cache(config) if granular else None,
            mixed=new_dynamic_cache(config),
            gate=model.gate.new_cache() if granular else None,
        )
        held = None
        step_input, step_pos = st.ids, st.positions[:, : st.length]
        while True:
            if hold is not None:
                if held is None:  # rank multipliers of the held mixture, computed once for every later step
                    held = model.prepare_scalings(hold)
                s, mix_with = hold, held
            else:
                s = model.compute_scalings(
                    step_input,
                    st.mask[:, : st.length],
                    step_pos,
                    past_key_values=cache.scaling,
                    use_cache=cache.scaling is not None,
                    gate_cache=cache.gate,
                )
                mix_with = s
                if mode == "prompt":
                    hold = s[:, -1:]
            with torch.no_grad():
                out = model(
                    step_input,
                    attention_mask=st.mask[:, : st.length],
                    position_ids=step_pos,
                    scalings=mix_with,
                    past_key_values=cache,
                    use_cache=True,
                    **model.last_logits_only,
                )
            yield out.logits[:, -1], s[:, -1]
            step_input = st.sequences[:, st.length - 1 : st.length]
            step_pos = st.positions[:, st.length - 1 : st.length]

    def _engine_forwards(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The decode engine (decode.py): the prompt eagerly into two static caches, then one compiled step per
        token over preallocated buffers. No host sync per step."""
        from .decode import advance, compiled_step, new_buffers, prefill, run_step

        model, st = self.model, self.state
        batch, slots = st.sequences.shape
        held = self.mode in ("prompt", "fixed")
        buffers = new_buffers(model, batch, slots, held=held, text_config=text_config(model.model))
        buffers.mask.copy_(st.mask)
        st.mask = buffers.mask  # one mask: the loop appends to it, the step reads it
        T = self.prompt_length
        logits, s = prefill(model, buffers, st.ids, st.positions[:, :T], mode=self.mode, fixed=self.fixed)
        yield logits, s
        step = compiled_step(model, batch, slots, held, self.backend)
        while True:
            at = st.length - 1
            advance(buffers, st.sequences[:, at], st.mask[:, at])
            logits, s = run_step(step, model, buffers)
            yield logits.clone(), s.clone()  # the step's outputs are overwritten by the next one (CUDA graphs)

    # ------------------------------------------------------------------ the result

    def output(
        self, scalings: torch.Tensor | None = None, logits: torch.Tensor | None = None, timings: dict | None = None
    ) -> GenerationOutput:
        """The `GenerationOutput` once the iteration ended (or was left early). Rows that ran past the last
        stop check are trimmed: `sequences` ends with the last row's last token, as in eager generation."""
        st = self.state
        n = int(st.lengths.max()) if st.length > self.prompt_length else 0
        stopped = st.stopped.tolist()
        return GenerationOutput(
            sequences=st.sequences[:, : self.prompt_length + n].contiguous(),
            prompt_length=self.prompt_length,
            mode=self.mode,
            scaling_layer=self.model.config.scaling_layer,
            finish_reasons=["stop" if row else "length" for row in stopped],
            lengths=st.lengths.tolist(),
            scalings=scalings[:, :n] if scalings is not None else None,
            logits=logits[:, :n] if logits is not None else None,
            timings=timings or {},
        )


def _compile_backend(model: LoraMixModel, compile: Any, use_cache: bool) -> Any:
    """The torch.compile backend for the decode engine, or None for the eager path (with a warning where
    compile was asked for but cannot apply)."""
    if compile is False or compile is None:
        return None
    if not use_cache:
        raise ConfigError("compile=True needs use_cache=True: the compiled step decodes over static KV caches")
    backend = "inductor" if compile is True else compile
    from .decode import compile_support

    reason = compile_support(model)
    if reason is not None:
        logger.warning("compile=True ignored, generating eagerly: %s", reason)
        return None
    return backend


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
    `scaling_layer` (checked against the gate's), `return_scalings`, `output_logits`, and `compile` (True, or a
    torch.compile backend name: decode with the compiled engine of decode.py; see docs/generation.md).
    """
    import time

    start = time.perf_counter()
    step_scalings, step_logits = [], []
    first_token_at = None
    run = Generation(model, input_ids, attention_mask, **kwargs)
    for step in run:
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if return_scalings:
            step_scalings.append(step.scalings)
        if output_logits:
            step_logits.append(step.logits)
    result = run.output(
        scalings=torch.stack(step_scalings, 1) if step_scalings else None,
        logits=torch.stack(step_logits, 1) if step_logits else None,
    )
    elapsed = time.perf_counter() - start
    result.timings = {
        "seconds": elapsed,
        "time_to_first_token": (first_token_at - start) if first_token_at else elapsed,
        "new_tokens": result.new_tokens.shape[1],
    }
    return result


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
    run = Generation(model, input_ids, tokenizer=tokenizer, **kwargs)
    eos = set(run.defaults.eos_token_ids)
    for step in run:  # one host sync per token: the text is shown as it comes
        token = int(step.token[0])
        if bool(step.finished[0]) and token in eos:
            continue  # the end-of-sequence token itself is not text
        piece = decoder.push(token)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def dominant_experts(scalings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scalings [..., L, N] -> (index [...], share [...]) of the expert with the largest mean scaling over layers."""
    mean = scalings.float().mean(-2)
    share, index = mean.max(-1)
    return index, share
