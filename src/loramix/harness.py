"""lm-evaluation-harness model "loramix": score a loramix checkpoint on lm-eval tasks without a server.

    pip install "loramix[eval]"
    python -m loramix.harness --model loramix --model_args checkpoint=DIR,mode=granular --tasks TASK ...

lm-eval (0.4.x) finds models only in its registry and has no plug-in discovery: importing this module registers
"loramix" (`lm_eval.api.registry.register_model`). `python -m loramix.harness ARGS` is lm-eval's own command line
(`lm_eval ARGS`) with the model registered; from Python, `import loramix.harness` before `lm_eval.simple_evaluate`.

Model arguments (`--model_args k=v,...`):
    checkpoint   a loramix checkpoint directory (required)
    mode         granular (default), prompt or truncated: how the gate mixes (docs/generation.md). In prompt mode a
                 continuation is scored with the scalings of the context's last token held, as if generated.
    system       mixture (default: the gate, in `mode`), base (every expert at 0), uniform (1/N each), or
                 expert:NAME (that expert alone): the baseline rows of `loramix eval`, as fixed scalings
    base, device, dtype, quantize   as for `loramix.load` (dtype: float32, bfloat16 or float16; quantize: int8,
                 int4, nf4 or none)
    batch_size   rows per forward (lm-eval's --batch_size; "auto" means 8)
    max_length   the longest sequence scored (default: the model's context)

Any other key is refused, naming the known ones (a typo such as `mod=prompt` would otherwise run the default); lm-eval's
own `max_batch_size` and `trust_remote_code` are accepted and ignored. Errors are one line (`python -m loramix.harness`
exits 1).

Log probabilities are those of the raw logits of the mixed model, over left-padded batches; they equal the server's
(`/v1/completions` with echo and logprobs) within float tolerance.

Data parallel: under `accelerate launch` (one machine or several) the model reports the launch's `rank` and
`world_size` (Accelerate's global process index and process count) and loads on its process's device, as lm-eval's
`hf` model does on GPUs; lm-eval's evaluator then gives each rank its share of the documents, gathers the results
with the model's `all_gather` / `gather_object` and writes them on rank 0 alone (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while it is empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:
    if __name__ == "__main__" and exc.name is not None and exc.name.split(".")[0] == "lm_eval":
        sys.exit("error: lm_eval is not installed: pip install 'loramix[eval]'")  # `python -m loramix.harness`
    raise

from .base import DTYPES, resolve_defaults
from .decode import MODES  # the one list of speed modes
from .errors import ConfigError, LoramixError
from .loading import load
from .parallel import finish, processes, threads_for_processes
from .quant import QUANTIZE_CHOICES
from .sampling import SamplingSettings
from .text import left_pad, render_chat

logger = logging.getLogger(__name__)

__all__ = ["LoramixLM", "main"]

SYSTEMS = ("mixture", "base", "uniform", "expert:NAME")
MODEL_ARGS = ("base", "batch_size", "checkpoint", "device", "dtype", "max_length", "mode", "quantize", "system")
"""The `--model_args` keys of the "loramix" model."""
LM_EVAL_ARGS = ("max_batch_size", "trust_remote_code")
"""What lm-eval itself adds to the model arguments (--max_batch_size, --trust_remote_code): accepted, ignored."""


def _batch_size(value: Any) -> int:
    """lm-eval's batch size: an integer >= 1 (also as a string), or "auto" / "auto:N" (8 here)."""
    if isinstance(value, str) and value.startswith("auto"):
        return 8
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"batch_size={value!r} must be an integer >= 1 or 'auto'")
    return value


def _check_args(mode: str, dtype: Any, quantize: Any, max_length: Any, rest: dict[str, Any]) -> None:
    """Refuse unknown keys and malformed values of --model_args before anything is loaded."""
    unknown = sorted(set(rest) - set(LM_EVAL_ARGS))
    if unknown:
        raise ConfigError(f"unknown model_args {unknown}; known: {', '.join(MODEL_ARGS)}")
    if rest:
        logger.info("ignoring lm-eval arguments %s", sorted(rest))
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; expected {', '.join(MODES)}")
    if dtype is not None and not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if quantize is not None and str(quantize).lower() not in (*QUANTIZE_CHOICES, "none"):
        raise ConfigError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)} or none")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ConfigError(f"max_length={max_length!r} must be an integer >= 1, or unset for the model's context")


@register_model("loramix")
class LoramixLM(TemplateLM):
    """A loramix checkpoint as an lm-eval model: loglikelihood, loglikelihood_rolling and generate_until, batched."""

    def __init__(
        self,
        checkpoint: str | None = None,
        mode: str = "granular",
        system: str = "mixture",
        base: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        model: Any = None,
        quantize: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_args(mode, dtype, quantize, max_length, kwargs)
        self.batch_size = _batch_size(batch_size)
        self.state = processes()
        if self.state.num_processes > 1:  # a launch: the evaluator splits the documents by rank
            self._rank = self.state.process_index  # global (hf uses the local index: one node's share per node)
            self._world_size = self.state.num_processes
            threads_for_processes(self.state)
            if device and str(device) != str(self.state.device):
                logger.info("accelerate launch: device=%s is replaced by this process's %s", device, self.state.device)
            device = str(self.state.device)
        if model is None:
            if not checkpoint:
                raise ConfigError("--model_args needs checkpoint=DIR (a loramix checkpoint directory)")
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                logger.info("device=%s: no CUDA device here, using the CPU (lm-eval passes cuda:0 by default)", device)
                device = None
            model = load(checkpoint, base=base, device=device, dtype=DTYPES.get(dtype, dtype), quantize=quantize)
        if model.tokenizer is None:
            raise ConfigError("the checkpoint has no tokenizer; lm-eval needs one")
        if mode == "truncated" and model.config.scaling_layer is None:
            raise ConfigError("mode=truncated needs a gate trained on a truncated scaling pass (config.scaling_layer)")
        self.mix = model
        self._device = model.device
        self.tokenizer = model.tokenizer
        self.mode = mode
        self.system = system
        self.fixed = self._fixed_weights(system)
        defaults = resolve_defaults(model, tokenizer=self.tokenizer)
        self.pad = defaults.pad_token_id
        self.eos_ids = defaults.eos_token_ids
        self.max_length = max_length or defaults.context or 2048

    def _fixed_weights(self, system: str) -> torch.Tensor | None:
        """[N] expert weights of a baseline system, or None for the gate's mixture."""
        names, n = self.mix.expert_names, self.mix.n_experts
        if system == "mixture":
            return None
        if system == "base":
            return torch.zeros(n)
        if system == "uniform":
            return torch.full((n,), 1.0 / n)
        if system.startswith("expert:") and system[7:] in names:
            return torch.eye(n)[names.index(system[7:])]
        raise ConfigError(f"system={system!r}; expected {', '.join(SYSTEMS)} with NAME one of {', '.join(names)}")

    # ------------------------------------------------------------------ data parallel (lm-eval's evaluator calls them)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, concatenated along the first dimension (a 0-d tensor counts as one row)."""
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's `obj` as a list on rank `dst`, None on the others."""
        if self.world_size <= 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self.state.wait_for_everyone()

    # ------------------------------------------------------------------ what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.eos_ids[0] if self.eos_ids else self.pad

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ chat templating (--apply_chat_template)

    @property
    def tokenizer_name(self) -> str:
        """What fingerprints lm-eval's request cache for templated prompts (the hf model's spelling)."""
        return str(getattr(self.tokenizer, "name_or_path", None) or "loramix").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template when one is asked for ("" for none: the plain fallback, text.render_chat)."""
        return (getattr(self.tokenizer, "chat_template", None) or "") if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot conversation as one prompt: the tokenizer's chat template, as lm-eval's hf model renders it
        (add_generation_prompt False continues the last assistant message), or loramix's plain fallback."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        text = render_chat(self.tokenizer, chat_history)
        return text if add_generation_prompt else text[: -len("assistant:")].rstrip("\n ")

    # ------------------------------------------------------------------ scoring

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, mask and positions [B, T]."""
        ids, mask = left_pad(rows, self.pad)
        device = self.mix.device
        return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp_min(0).to(device)

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]], held_from: list[int]) -> torch.Tensor:
        """log_softmax of the mixed model's logits [B, T, V] for left-padded rows. held_from[r]: in prompt mode, the
        number of trailing positions of row r that take the scalings of the position before them."""
        ids, mask, pos = self._batch(rows)
        model = self.mix
        if self.fixed is not None:
            w = self.fixed.to(model.device, model.dtype)
            scalings = w.expand(ids.shape[0], ids.shape[1], model.n_layers, model.n_experts)
            logits = model(ids, attention_mask=mask, position_ids=pos, scalings=scalings).logits
        elif self.mode == "prompt":
            scalings = model.compute_scalings(ids, mask, pos).clone()
            width = ids.shape[1]
            for r, n in enumerate(held_from):
                if n > 0:
                    scalings[r, width - n :] = scalings[r, width - n - 1]
            logits = model(ids, attention_mask=mask, position_ids=pos, scalings=scalings).logits
        else:
            logits = model(ids, attention_mask=mask, position_ids=pos).logits
        return torch.log_softmax(logits.float(), -1)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append(whole[:-1])
                conts.append(continuation)
            # in prompt mode the continuation's own tokens (all but its last, which is never an input) are held
            logprobs = self._logprobs(rows, [len(c) - 1 for c in conts])
            for r, i in enumerate(chunk):
                n = len(conts[r])
                at = logprobs[r, -n:]
                target = torch.tensor(conts[r], device=at.device)
                chosen = at.gather(-1, target[:, None])[:, 0]
                greedy = bool((at.argmax(-1) == target).all())
                results[i] = (float(chosen.sum()), greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) answers, cut before the first `until` string; a row stops
        generating once it has written one (stop strings), not at `max_gen_toks`; requests with equal generation
        settings run in batches."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            settings = dict(requests[members[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(settings.pop("temperature", 0.0))
            do_sample = bool(settings.pop("do_sample", False)) or temperature > 0
            picked = {key: settings.pop(key) for key in ("top_p", "top_k", "seed") if key in settings}
            sampling = SamplingSettings.for_generate(do_sample, temperature or 1.0, **picked)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new, "mode": self.mode, "sampling": sampling}
            kwargs["tokenizer"] = self.tokenizer
            # rows stop where their answer ends (lm-eval's hf model does the same), and are cut there
            kwargs["stop_strings"] = [stop for stop in until if stop] or None
            if settings:
                logger.warning("generate_until: ignoring generation arguments %s", sorted(settings))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                rows = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in chunk]
                ids, mask, _ = self._batch(rows)
                if self.fixed is not None:
                    w = self.fixed.to(self.mix.device, self.mix.dtype)
                    kwargs["scalings"] = w.expand(self.mix.n_layers, self.mix.n_experts)
                    kwargs.pop("mode", None)
                out = self.mix.generate(ids, mask, **kwargs)
                for r, i in enumerate(chunk):
                    text = out.texts[r]  # request.py: cut before the first `until` string, as everywhere
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


def main() -> None:
    """lm-eval's command line with the "loramix" model registered (`python -m loramix.harness ...`); loramix's
    errors (bad model_args, a broken checkpoint) are one line and exit code 1, as in the `loramix` command."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            finish(processes())  # under a launch: every rank waits for rank 0's results, then the group goes down
    except LoramixError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
