"""Load test of `loramix serve` on loopback: N requests at concurrency C (OpenAI /v1/completions, greedy), with and
without request batching, bounded in time. Reports p50/p99 latency, generated tokens/s, errors, and the server's
resident memory before and after.

    python benchmarks/serve_load.py                          # the demo checkpoint shipped in the package
    python benchmarks/serve_load.py --checkpoint CKPT --requests 200 --concurrency 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import machine

PROMPTS = [  # the demo's formats (docs/demo.md)
    "GRAVY<GLWSKIKEVGKEAAKAAAKAAGKAALGAVSEAV>=",
    "GRAVY<YVPLPNVPQPGRRPFPTFPGQGPFNPKIKWPQGY>=",
    "DESIGN<0.30,24>=",
    "What is the one-letter code of lysine?",
    "1.25+0.33=",
    "DESIGN<-1.10,16>=",
    "What is the mass of W?",
    "-0.75+0.50=",
]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, model: str, n: int, concurrency: int, max_tokens: int, deadline: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    errors = 0

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> None:
            nonlocal tokens, errors
            async with sem:
                if time.time() > deadline:
                    errors += 1
                    return
                start = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/completions",
                        json={
                            "model": model,
                            "prompt": PROMPTS[i % len(PROMPTS)],
                            "max_tokens": max_tokens,
                            "temperature": 0,
                        },
                    )
                    if r.status_code != 200:
                        errors += 1
                        return
                    tokens += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - start)
                except httpx.HTTPError:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {
        "elapsed": elapsed,
        "ok": len(latencies),
        "errors": errors,
        "tokens": tokens,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": q(0.99),
        "tokens_per_s": tokens / elapsed,
    }


def run(checkpoint: Path, batching: bool, args: argparse.Namespace) -> dict:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "loramix",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--model-id",
        "bench",
        "--batching" if batching else "--no-batching",
        "--max-batch",
        str(args.max_batch),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.1)
        httpx.post(url + "/v1/completions", json={"model": "bench", "prompt": "warm up", "max_tokens": 4}, timeout=60)
        before = _rss_mb(server.pid)
        result = asyncio.run(
            _load(url, "bench", args.requests, args.concurrency, args.max_tokens, time.time() + args.time_limit)
        )
        result["rss_before_mb"], result["rss_after_mb"] = before, _rss_mb(server.pid)
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the demo checkpoint in the package")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; later requests count as errors")
    parser.add_argument("--modes", nargs="+", default=["batching", "no-batching"])
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:
        from loramix.demo import shipped_checkpoint

        checkpoint = shipped_checkpoint()
    print(
        f"machine: {machine()}; server threads {args.threads}; {args.requests} requests at concurrency "
        f"{args.concurrency}, max_tokens {args.max_tokens}, greedy; checkpoint {checkpoint}"
    )
    print(
        "| server | requests ok | errors | p50 latency (s) | p99 latency (s) | generated tokens/s | wall (s) | "
        "RSS before (MiB) | RSS after (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        r = run(checkpoint, mode == "batching", args)
        print(
            f"| {mode} (max batch {args.max_batch if mode == 'batching' else 1}) | {r['ok']} | {r['errors']} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['tokens_per_s']:.1f} | {r['elapsed']:.1f} | "
            f"{r['rss_before_mb']:.0f} | {r['rss_after_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
