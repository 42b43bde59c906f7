"""Serving memory, as a user sees it: `loramix serve` in a subprocess on loopback, its VmRSS / VmHWM from /proc.

Scenarios (--scenarios):
    memory    the SmolLM2 export (`loramix demo --model smollm2 --export DIR`, built here unless --smollm2 DIR),
              default flags, 8 concurrent short chat requests: VmRSS after /health and VmHWM after the load, for this
              checkout and for --today-src's server when given
    budget    the SmolLM2 export (--smollm2), --kv-cache-memory 1GiB, 8 concurrent chat requests of 512 new tokens
              (EOS biased out): VmHWM above its start-up value
    long      a tiny random Llama with a 32k context, --kv-cache-memory 512MiB: one request with a 20,000-token
              prompt and 16 short requests at once, each text against the library's greedy text; then a
              40,000-token request (its status: 400 expected)
    prefix    the ~25M Llama (benchmarks/common.py): 16 requests sharing a 1,536-token system prompt, each with its
              own 32-token question, sent one after another: time to first token of the first (cold) against the
              median of the others (the prefix cached); the same with --no-enable-prefix-caching
    chunked   the ~25M Llama with an 8k context: 8 rows stream 160 tokens each; after 2 s a 4,096-token prompt
              joins; the streaming rows' longest gap between two tokens, at the default --max-num-batched-tokens
              and with 8192 (the prompt in one piece), interleaved over --rounds rounds

    python benchmarks/serve_memory.py --scenarios memory --today-src /path/to/previous/src
    python benchmarks/serve_memory.py --scenarios long prefix chunked --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_load import _free_port, random_checkpoint, wait_healthy

from common import build_base, build_experts, machine

SRC = Path(__file__).resolve().parents[1] / "src"
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
QUESTIONS = [
    "What is photosynthesis?",
    "Name a protein.",
    "What is 2+2?",
    "Say hello.",
    "What is DNA?",
    "Name a planet.",
    "What is water?",
    "Define enzyme.",
]


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in GiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 2**20
    return out


class Served:
    """`loramix serve CKPT` in a subprocess from the source tree `src`; `lines`: what it printed at start."""

    def __init__(self, checkpoint: Path, src: Path, flags: list[str], threads: int) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "loramix", "serve", str(checkpoint), "--port", str(self.port)]
        cmd += ["--log-level", "warning", "--model-id", "bench", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.proc, self.url, 300, lambda: (self.log.seek(0), self.log.read())[1])
        self.log.seek(0)
        self.lines = [line for line in self.log.read().splitlines() if "KV cache pool" in line]

    def status(self) -> dict[str, float]:
        return status(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def body(prompt: str, max_tokens: int, stream: bool = False, no_eos: str | None = None) -> dict:
    out = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if no_eos is not None:
        out["logit_bias"] = {no_eos: -100}
    return out


async def gather(url: str, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


async def streamed(client: httpx.AsyncClient, b: dict) -> dict:
    """One streamed request: time to first token and the arrival times of its pieces."""
    start, times = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json={**b, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())  # a token's chunk (its text may be empty: a partial character)
    return {"ttft": times[0] - start, "times": times}


# ---------------------------------------------------------------------- scenarios


def export_smollm2(src: Path) -> Path:
    """`loramix demo --model smollm2 --export` into a temporary directory."""
    smollm2 = Path(tempfile.mkdtemp(prefix="smollm2_")) / "export"
    subprocess.run(
        [sys.executable, "-m", "loramix", "demo", "--model", "smollm2", "--export", str(smollm2)],
        env={**os.environ, "PYTHONPATH": str(src)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return smollm2


def memory(src: Path, today: Path | None, threads: int, smollm2: Path) -> list[str]:
    chat = {"model": "bench", "max_tokens": 32, "temperature": 0}
    bodies = [{**chat, "messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    rows = ["| server | flags | VmRSS after /health | VmHWM after 8 chat requests |", "|---|---|---|---|"]
    for name, tree in (("this checkout", src), ("previous (--today-src)", today)):
        if tree is None:
            continue
        served = Served(smollm2, tree, [], threads)
        start = served.status()["VmRSS"]
        replies = asyncio.run(gather(served.url, bodies, "/v1/chat/completions"))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        after = served.status()
        served.close()
        rows.append(f"| {name} | defaults | {start:.2f} GiB | {after['VmHWM']:.2f} GiB |")
        rows += [f"|  | {line.strip()} | | |" for line in served.lines]
    return rows


def budget(src: Path, threads: int, smollm2: Path) -> list[str]:
    """--kv-cache-memory 1GiB under 8 chat requests of 512 new tokens each (EOS biased out)."""
    chat = {"model": "bench", "max_tokens": 512, "temperature": 0, "logit_bias": {str(i): -100 for i in range(3)}}
    rows = []
    served = Served(smollm2, src, ["--kv-cache-memory", "1GiB", "--max-tokens", "512"], threads)
    start = served.status()["VmHWM"]
    long = [{**chat, "messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    replies = asyncio.run(gather(served.url, long, "/v1/chat/completions"))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    high = served.status()["VmHWM"]
    served.close()
    rows.append(
        f"| this checkout | --kv-cache-memory 1GiB, 8 x 512 new tokens ({tokens} generated) | VmHWM "
        f"{start:.2f} GiB at start | {high:.2f} GiB (+{high - start:.2f} GiB) |"
    )
    return rows


def long_context(src: Path, threads: int) -> list[str]:
    import torch
    from transformers import AutoTokenizer

    import loramix
    from loramix.sampling import SamplingSettings

    torch.set_num_threads(threads)
    checkpoint = random_checkpoint(
        Path(tempfile.mkdtemp(prefix="long_")),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    rng = random.Random(0)
    long_prompt = "".join(rng.choice(RESIDUES) for _ in range(20_000))
    n_long = len(tokenizer(long_prompt).input_ids)
    shorts = [f"GRAVY<{''.join(rng.choice(RESIDUES) for _ in range(12))}>=" for _ in range(16)]
    served = Served(
        checkpoint, src, ["--kv-cache-memory", "512MiB", "--max-batch", "17", "--max-tokens", "16"], threads
    )
    start = time.perf_counter()
    bodies = [body(long_prompt, 16, no_eos="2")] + [body(p, 16, no_eos="2") for p in shorts]
    replies = asyncio.run(gather(served.url, bodies))
    elapsed = time.perf_counter() - start
    too_long = httpx.post(served.url + "/v1/completions", json=body("A" * 40_000, 4), timeout=600)
    high = served.status()["VmHWM"]
    served.close()
    model = loramix.load(checkpoint)
    equal = 0
    for b, r in zip(bodies, replies):
        ids = torch.tensor([tokenizer(b["prompt"]).input_ids])
        out = model.generate(ids, max_new_tokens=16, sampling=SamplingSettings(logit_bias={2: -100.0}))
        equal += r.status_code == 200 and r.json()["choices"][0]["text"] == tokenizer.decode(
            out.new_tokens[0].tolist(), skip_special_tokens=True
        )
    return [
        f"32k-context tiny Llama, --kv-cache-memory 512MiB: {served.lines[0].strip() if served.lines else ''}",
        f"one {n_long}-token prompt + 16 short requests at once: {sum(r.status_code == 200 for r in replies)}/17 "
        f"answered in {elapsed:.1f} s, {equal}/17 equal to the library's greedy text; server VmHWM {high:.2f} GiB",
        f"a 40,000-token request: HTTP {too_long.status_code}: {too_long.json()['error']['message'][:120]}",
    ]


def bench_checkpoint(root: Path, context: int) -> Path:
    """The ~25M Llama of serve_load.py's library scenario (its blocks; the demo tokenizer's vocabulary) with a longer
    context, no EOS."""
    from transformers import AutoTokenizer

    import loramix
    from loramix.demo import shipped_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(shipped_checkpoint() / "tokenizer")
    base = build_base(  # the tokenizer's vocabulary, so that every token is text (a streamed piece)
        root,
        vocab_size=len(tokenizer),
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        max_position_embeddings=context,
    )
    experts = build_experts(base, root, n=4, rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(), tokenizer=tokenizer)
    return model.save(root / "checkpoint", include_base=True)


def prefix(src: Path, threads: int) -> list[str]:
    checkpoint = bench_checkpoint(Path(tempfile.mkdtemp(prefix="prefix_")), 2048)
    rng = random.Random(1)
    system = "".join(rng.choice(RESIDUES) for _ in range(1536))
    questions = [system + "".join(rng.choice(RESIDUES) for _ in range(32)) for _ in range(16)]
    rows = []
    for flags in ([], ["--no-enable-prefix-caching"]):
        served = Served(checkpoint, src, ["--max-tokens", "8", *flags], threads)

        async def run(url: str) -> list[float]:
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                return [(await streamed(client, body(q, 4)))["ttft"] for q in questions]

        ttft = asyncio.run(run(served.url))
        hits = [
            line
            for line in httpx.get(served.url + "/metrics").text.splitlines()
            if line.startswith("loramix_prefix_cache_hit_tokens_total")
        ]
        served.close()
        warm = statistics.median(ttft[1:])
        rows.append(
            f"{' '.join(flags) or 'prefix caching on'}: first (cold) {ttft[0] * 1000:.0f} ms, the other 15 "
            f"median {warm * 1000:.0f} ms = {warm / ttft[0]:.2f}x; {hits[0] if hits else ''}"
        )
    return rows


def chunked(src: Path, threads: int, rounds: int) -> list[str]:
    checkpoint = bench_checkpoint(Path(tempfile.mkdtemp(prefix="chunked_")), 8192)
    rng = random.Random(2)
    long_prompt = "".join(rng.choice(RESIDUES) for _ in range(4096))
    streams = [f"GRAVY<{''.join(rng.choice(RESIDUES) for _ in range(20))}>=" for _ in range(8)]
    servers = {
        "chunked (default --max-num-batched-tokens 512)": Served(checkpoint, src, ["--max-tokens", "200"], threads),
        "one piece (--max-num-batched-tokens 8192)": Served(
            checkpoint, src, ["--max-tokens", "200", "--max-num-batched-tokens", "8192"], threads
        ),
    }
    gaps: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(rounds):
            for name, served in servers.items():

                async def run(url: str) -> float:
                    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                        rows = [asyncio.create_task(streamed(client, body(p, 160))) for p in streams]
                        await asyncio.sleep(2.0)
                        joined = asyncio.create_task(streamed(client, body(long_prompt, 4)))
                        done = await asyncio.gather(*rows, joined)
                    return max(max(b - a for a, b in zip(r["times"], r["times"][1:])) for r in done[:-1])

                gaps[name].append(asyncio.run(run(served.url)))
    finally:
        for served in servers.values():
            served.close()
    (a, chunk), (b, whole) = ((k, statistics.median(v)) for k, v in gaps.items())
    return [
        f"{a}: longest gap {chunk * 1000:.0f} ms",
        f"{b}: longest gap {whole * 1000:.0f} ms",
        f"ratio chunked / one piece: {chunk / whole:.2f}x (medians of {rounds} rounds)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["memory", "budget", "long", "prefix", "chunked"])
    parser.add_argument("--today-src", type=Path, default=None, help="src/ of the previous server (memory)")
    parser.add_argument("--smollm2", type=Path, default=None, help="an existing SmolLM2 export (memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; torch threads {args.threads}; load average {os.getloadavg()}")
    if args.smollm2 is None and {"memory", "budget"} & set(args.scenarios):
        args.smollm2 = export_smollm2(SRC)
    for scenario in args.scenarios:
        if scenario == "memory":
            lines = memory(SRC, args.today_src, args.threads, args.smollm2)
        elif scenario == "budget":
            lines = budget(SRC, args.threads, args.smollm2)
        elif scenario == "long":
            lines = long_context(SRC, args.threads)
        elif scenario == "prefix":
            lines = prefix(SRC, args.threads)
        else:
            lines = chunked(SRC, args.threads, args.rounds)
        print(f"\n## {scenario}\n" + "\n".join(lines), flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
