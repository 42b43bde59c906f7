"""Generation: a batch of prompts in, tokens out, on the decoder (decode.py) that the server runs too.

Every decode step, for the new token x_t:
    scaling pass:  backbone(x_t, cache_1) -> h_t          (cache_1 holds the scaling pass's keys/values)
    gate:          s_t = gate(h_t)                         [B, 1, L, N]  (a context gate: gate(h_t, cache_3))
    mixed pass:    model(x_t, cache_2, scalings=s_t)      (cache_2 holds the mixed pass's keys/values)
This equals recomputing the whole prefix through both passes (tests check it token for token). One shared cache
would be wrong: the two passes see different hidden states.

`generate` is "every row joins the decoder, step until done": static caches sized to the prompt and the answer,
eager by default, compiled with `compile=True` (CUDA graphs on CUDA). The recomputing path (`use_cache=False`) is
the test oracle, and what a base without static-cache support runs (with a warning).

Modes (recorded in the output):
    granular   scalings for every token; both passes every step (the method as published).
    prompt     scalings computed per token on the prompt; every generated token reuses the scalings of the LAST
               prompt token, so a decode step is one mixed pass and nothing else.
    truncated  granular, with the scaling pass stopped after `config.scaling_layer` blocks. The gate must have been
               trained for that k: the mode needs a model whose config records it.
    fixed      (when `scalings=` is given) one mixture for every token, prompt included; no scaling pass at all.
               Used for baselines: single experts, uniform merge, a per-prompt router.
Sampling: sampling.py (one batched sampler for greedy and sampled rows). Each row's tokens, text, stop strings,
finish reason and failure: request.py, the `RequestState` the server drives too (a failing row ends alone,
"error"; the others go on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import resolve_defaults, text_config
from .blocks import static_cache_support
from .contracts import MixedModel
from .decode import HELD_MODES, MODES, Decoder, RowSpec, cache_slots, compile_support, non_finite_rows
from .errors import ConfigError, LoramixError
from .grammar import Grammar
from .request import RequestState, check_stops
from .sampling import Sampler, SamplingSettings, row_generator

logger = logging.getLogger(__name__)

__all__ = ["DecodeState", "Generation", "GenerationOutput", "Step", "generate", "stream"]


@dataclass
class GenerationOutput:
    """Result of `generate`.

    sequences:  [B, T + n] the prompt (as given, padding included) followed by the generated tokens; rows that
                stopped early are filled with `pad_token_id`.
    scalings:   [B, n, L, N] (with return_scalings): the scalings of the forward step that produced each generated
                token, i.e. those of the position just before it (the last prompt token for the first one).
    logits:     [B, n, V] (with output_logits): the raw logits of each step, before any processing.
    lengths:    per row, the generated tokens up to and including the one that stopped it (the rest is padding).
    finish_reasons: per row, "stop" (an end token or a stop string), "length" or "error" (request.py).
    texts:      per row, the answer's text (with a tokenizer): stop strings cut, unless
                include_stop_str_in_output; the end token is not text. None without a tokenizer.
    errors:     per row, None, or why the row failed (finish reason "error": non-finite logits or scalings, a
                grammar that could go no further); the row ended there, alone.
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
    texts: list[str] | None = None
    errors: list[str | None] = field(default_factory=list)

    @property
    def new_tokens(self) -> torch.Tensor:
        """[B, n] the generated tokens only."""
        return self.sequences[:, self.prompt_length :]


def _check_args(
    model: MixedModel, input_ids: torch.Tensor, max_new_tokens: int, mode: str, scaling_layer: int | None
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
    finished [B] bool, broken_at [B] long (the step at which a row's logits or scalings were not finite, 0: never),
    lengths [B] long (tokens generated up to and including the one that ended the row): kept on the device, read
    back every `check_every` steps.
    """

    sequences: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    length: int
    finished: torch.Tensor
    broken_at: torch.Tensor
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
        zero = torch.zeros_like(no, dtype=torch.long)
        return cls(sequences, full_mask, positions, prompt, no, zero, zero.clone())

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
"""On an accelerator, how many steps run between two reads of the stop flags (the only host sync of the loop)."""


class Generation:
    """A generation in progress: iterate it for one `Step` per generated token; then `output()` gives the result.

    Takes the arguments of `generate` (except return_scalings / output_logits, which `generate` collects). The
    arguments are checked and the defaults resolved when it is made (`defaults` holds them), before any forward.
    """

    def __init__(
        self,
        model: MixedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        sampling: SamplingSettings | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        tokenizer: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        mode: str = "granular",
        scalings: torch.Tensor | None = None,
        scaling_layer: int | None = None,
        streamer: Any = None,
        compile: Any = False,
        json_schema: Any = None,
        grammar: Any = None,
        text_per_step: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.model = model
        self.max_new_tokens = _check_args(model, input_ids, max_new_tokens, mode, scaling_layer)
        if sampling is None:
            sampling = SamplingSettings.for_generate(
                do_sample, temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
            )
        self.sampling = sampling
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.defaults = resolve_defaults(
            model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, tokenizer=tokenizer
        )
        stops = check_stops(stop_strings, "stop_strings")
        self.tokenizer = tokenizer

        def request() -> RequestState:
            return RequestState(
                tokenizer,
                max_tokens=self.max_new_tokens,
                stops=stops,
                end_ids=self.defaults.eos_token_ids,
                include_stop_str_in_output=include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens,
            )

        self._request = request
        # the text decides when a row stops (stop strings), or a caller streams it: each row's RequestState is fed
        # every step (one host read per step); otherwise end tokens stop rows on the device and the states are
        # replayed from the tokens at the end (the same result: tests check both)
        self.by_text = bool(stops) or text_per_step
        self.requests = [request() for _ in range(input_ids.shape[0])] if self.by_text else None
        self.failures: dict[int, str] = {}  # rows whose grammar could go no further: why
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
        self.grammars = self._grammars(tokenizer, json_schema, grammar, ids.shape[0])
        self.backend = _decoder_backend(model, compile, use_cache)
        self.prompt_length = ids.shape[1]
        columns = self.prompt_length + self.max_new_tokens
        if self.backend is not None:
            columns = cache_slots(columns, self.defaults.context)
        self.state = DecodeState.start(ids, mask, columns, self.defaults.pad_token_id)
        self.eos = torch.tensor(self.defaults.eos_token_ids, device=device) if self.defaults.eos_token_ids else None
        self._sampler: Sampler | None = None
        self._done = False

    def _grammars(self, tokenizer: Any, json_schema: Any, grammar: Any, batch: int) -> list[Grammar | None]:
        """Each row's grammar: `json_schema` for every row (compiled here), or `grammar`, one Grammar for every row
        or a list with one per row (None: unconstrained)."""
        if json_schema is not None and grammar is not None:
            raise ConfigError("pass json_schema or grammar, not both")
        if json_schema is not None:
            grammar = Grammar.for_model(self.model, json_schema, tokenizer=tokenizer)
        if grammar is None or isinstance(grammar, Grammar):
            return [grammar] * batch
        grammars = list(grammar)
        if len(grammars) != batch or not all(g is None or isinstance(g, Grammar) for g in grammars):
            raise ConfigError(f"grammar must be a Grammar, or a list of {batch} (one per row, None for no grammar)")
        return grammars

    # ------------------------------------------------------------------ the loop

    def __iter__(self) -> Iterator[Step]:
        if self._done:
            return
        st = self.state
        if self.streamer is not None:
            self.streamer.put(st.ids.cpu())
        on_host = self.model.device.type == "cpu" or self.streamer is not None
        check_every = 1 if on_host else STOP_CHECK_EVERY
        forwards = self._decoder_steps() if self.backend is not None else self._recomputed_steps()
        try:
            for index in range(self.max_new_tokens):
                logits, step_scalings, token = next(forwards)
                # a row fails alone, before its token counts: non-finite values (on the device), or its grammar
                bad = non_finite_rows(logits, step_scalings) & ~st.finished
                st.broken_at = torch.where(bad, index + 1, st.broken_at)
                st.finished = st.finished | bad | self._grammar_failed(index)
                token = torch.where(st.finished, torch.full_like(token, self.defaults.pad_token_id), token)
                st.append(token)
                if self.streamer is not None:
                    self.streamer.put(token.cpu())
                if self.requests is not None:  # the one host read of this step
                    for state, t, ended in zip(self.requests, *torch.stack([token, st.finished]).tolist()):
                        if not ended:
                            state.push(t)
                    newly = torch.tensor([s.done for s in self.requests], device=token.device)
                elif self.eos is not None:
                    newly = torch.isin(token, self.eos)
                else:
                    newly = torch.zeros_like(st.finished)
                st.finished = st.finished | newly
                yield Step(index, token, logits, step_scalings, st.finished)
                at_check = (index + 1) % check_every == 0 or index + 1 == self.max_new_tokens
                if at_check and bool(st.finished.all()):  # the one host read of these steps
                    break
        finally:
            forwards.close()
            self._done = True
            if self.streamer is not None:
                self.streamer.end()

    def _grammar_failed(self, index: int) -> torch.Tensor:
        """[B] bool: the rows whose grammar could go no further at this step (each recorded once, with why)."""
        failed = torch.zeros_like(self.state.finished)
        for row, why in self._sampler.failures.items() if self._sampler is not None else ():
            if row not in self.failures:
                self.failures[row] = f"structured output failed at step {index + 1}: {why}"
                failed[row] = True
        return failed

    def _specs(self) -> list[RowSpec]:
        device, n = self.model.device, self.state.sequences.shape[0]
        shared = self.generator is not None or self.sampling.seed is None
        return [
            RowSpec(
                mode=self.mode,
                sampling=self.sampling,
                generator=None if shared else row_generator(self.sampling.seed, i, device),
                max_new_tokens=self.max_new_tokens,
                fixed=self.fixed[i] if self.fixed is not None else None,
                grammar=self.grammars[i],
            )
            for i in range(n)
        ]

    def _decoder_steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(logits [B, V], scalings [B, L, N], tokens [B]) per step: every row joins the decoder, then it steps."""
        st, T = self.state, self.prompt_length
        granular = self.mode not in HELD_MODES
        backend = None if self.backend == "eager" else self.backend
        decoder = Decoder(
            self.model,
            st.sequences.shape[0],
            st.sequences.shape[1],
            granular=granular,
            compile=backend or False,
            generator=self.generator,
        )
        self._sampler = decoder.sampler
        decoder.place(T, self.max_new_tokens - 1)
        joined = decoder.join(list(range(decoder.batch)), st.ids, st.mask[:, :T], self._specs())
        yield joined.logits, joined.scalings, joined.tokens
        while True:
            out = decoder.step()
            yield out.logits, out.scalings, out.tokens

    def _recomputed_steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The reference: the whole prefix through both passes for every token (no cache)."""
        model, st, mode = self.model, self.state, self.mode
        sampler = Sampler(
            st.sequences.shape[0], model.model.get_output_embeddings().weight.shape[0], model.device, self.generator
        )
        self._sampler = sampler
        rows = slice(0, st.sequences.shape[0])
        for i, spec in enumerate(self._specs()):
            sampler.set_row(i, spec.sampling, st.ids[i][st.mask[i, : st.length].bool()], spec.generator, spec.grammar)
        prompt_scalings = None
        while True:
            ids_now, mask_now, pos_now = st.ids, st.mask[:, : st.length], st.positions[:, : st.length]
            if self.fixed is not None:
                s = self.fixed.expand(-1, ids_now.shape[1], -1, -1)
            elif mode == "prompt" and prompt_scalings is not None:
                extra = ids_now.shape[1] - prompt_scalings.shape[1]
                s = torch.cat([prompt_scalings, prompt_scalings[:, -1:].expand(-1, extra, -1, -1)], 1)
            else:
                s = model.compute_scalings(ids_now, mask_now, pos_now)
                if mode == "prompt":
                    prompt_scalings = s
            with torch.no_grad():
                out = model(
                    ids_now, attention_mask=mask_now, position_ids=pos_now, scalings=s, **model.last_logits_only
                )
            logits = out.logits[:, -1]
            token = sampler.choose(logits, rows)
            sampler.record(rows, token)
            yield logits, s[:, -1], token

    # ------------------------------------------------------------------ the result

    def output(
        self, scalings: torch.Tensor | None = None, logits: torch.Tensor | None = None, timings: dict | None = None
    ) -> GenerationOutput:
        """The `GenerationOutput` once the iteration ended (or was left early). Rows that ran past the last
        stop check are trimmed: `sequences` ends with the last row's last token."""
        st = self.state
        n = int(st.lengths.max()) if st.length > self.prompt_length else 0
        lengths, broken_at = torch.stack([st.lengths, st.broken_at]).tolist()
        requests = self.requests
        if requests is None:  # replay each row's tokens: the same states as fed step by step
            new = st.sequences[:, self.prompt_length : self.prompt_length + n].tolist()
            requests = [self._request() for _ in lengths]
            for state, tokens, k in zip(requests, new, lengths):
                for token in tokens[:k]:
                    state.push(token)
        for row, state in enumerate(requests):
            if broken_at[row]:
                state.fail(
                    f"non-finite logits or scalings at step {broken_at[row]} in {self.model.dtype}: check the gate "
                    "and experts for NaN or overflow, or run in float32"
                )
            elif row in self.failures:
                state.fail(self.failures[row])
            state.finish("length")  # a generation left early, or at the context's end
        errors = [state.error for state in requests]
        if any(errors):
            failed = [row for row, error in enumerate(errors) if error]
            logger.warning("%d of %d rows failed (rows %s): %s", len(failed), len(errors), failed, errors[failed[0]])
        return GenerationOutput(
            sequences=st.sequences[:, : self.prompt_length + n].contiguous(),
            prompt_length=self.prompt_length,
            mode=self.mode,
            scaling_layer=self.model.config.scaling_layer,
            finish_reasons=[state.finish_reason for state in requests],
            lengths=lengths,
            scalings=scalings[:, :n] if scalings is not None else None,
            logits=logits[:, :n] if logits is not None else None,
            timings=timings or {},
            texts=[state.text for state in requests] if self.tokenizer is not None else None,
            errors=errors,
        )


def _decoder_backend(model: MixedModel, compile: Any, use_cache: bool) -> Any:
    """How the decoder runs: "eager" (static caches, no compile), a torch.compile backend, or None for the
    recomputing path (use_cache=False, or a base without static caches: warned)."""
    if not use_cache:
        if compile is not False and compile is not None:
            raise ConfigError("compile=True needs use_cache=True: the compiled step decodes over static KV caches")
        return None
    reason = static_cache_support(model)
    if reason is not None:
        logger.warning("no static KV caches, so every token recomputes the whole prefix (slow): %s", reason)
        return None
    if compile is False or compile is None:
        return "eager"
    reason = compile_support(model)
    if reason is not None:
        logger.warning("compile=True ignored, generating eagerly: %s", reason)
        return "eager"
    return "inductor" if compile is True else compile


@torch.no_grad()
def generate(
    model: MixedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    return_scalings: bool = False,
    output_logits: bool = False,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate from a batch of (left-padded) prompts of a LoraMixModel. Arguments as in transformers' `generate`:

    max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty (or `sampling=` a SamplingSettings),
    eos_token_id, pad_token_id, stop_strings (+ tokenizer; cut from `texts`, kept with include_stop_str_in_output),
    seed or generator, use_cache (default True; False
    recomputes the prefix for every token: the reference), streamer (a transformers streamer), plus `mode`
    ("granular", "prompt", "truncated"), `scalings` (fixed mixture, see module docstring), `scaling_layer` (checked
    against the gate's), `return_scalings`, `output_logits`, and `compile` (True, or a torch.compile backend name:
    the decode step compiled; see docs/generation.md), and structured output: `json_schema` (a dict, a JSON string
    or a pydantic model class; every row's answer is JSON valid against it) or `grammar` (a `grammar.Grammar`, or
    one per row with None for an unconstrained row); see docs/generation.md.
    """
    start = time.perf_counter()
    step_scalings, step_logits = [], []
    first_token_at = None
    run = Generation(model, input_ids, attention_mask, **kwargs)
    for step in run:
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if return_scalings:
            step_scalings.append(step.scalings.clone())  # the decoder's buffers are overwritten by the next step
        if output_logits:
            step_logits.append(step.logits.clone())
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
    model: MixedModel,
    prompt: str | torch.Tensor,
    *,
    tokenizer: Any = None,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the generated text piece by piece (one prompt; stop strings cut, never shown in part). Takes the
    arguments of `generate`. A failure of the row (finish reason "error") raises `LoramixError` after its text."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ConfigError("streaming text needs a tokenizer (pass tokenizer=... or load a checkpoint that has one)")
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        input_ids = prompt if prompt.dim() == 2 else prompt[None]
    if input_ids.shape[0] != 1:
        raise ConfigError("stream() takes one prompt; use generate() for batches")
    run = Generation(
        model, input_ids, tokenizer=tokenizer, text_per_step=True, skip_special_tokens=skip_special_tokens, **kwargs
    )
    request = run.requests[0]
    for _ in run:  # one host sync per token: the text is shown as it comes
        piece = request.take()
        if piece:
            yield piece
    run.output()  # the row's finish reason, or its failure
    rest = request.take()
    if rest:
        yield rest
    if request.error:
        raise LoramixError(request.error)
