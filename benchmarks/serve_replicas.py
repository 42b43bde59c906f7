"""Ray Serve replicas (`loramix serve --replicas N`, issue 31): one replica against two, and the start-up time.

Throughput: one local Ray instance (this process is its driver) serves the ~25M-parameter random Llama of
serve_load.py's "library" scenario (4 rank-8 experts, the demo's tokenizer, no EOS) with 1 torch thread per replica
and each server's default --max-batch 8 (--max-batch changes it). Each round scales the same application to 1
replica and to 2 (the order alternating; a replica that starts is warmed up before the clock runs) and sends 16
concurrent greedy requests of 96 new tokens (OpenAI /v1/completions over httpx); tokens/s over the wall time. The
ratio is two replicas' tokens/s over one replica's in the same round (median over rounds). A one-process
`loramix serve` (no Ray, 1 thread) is measured in the same rounds for the cost of Ray's proxy.

Start-up: `loramix serve CKPT --replicas 2` in a subprocess (a local Ray instance, 2 replicas loading the
checkpoint), from launch until /health answers; `loramix serve CKPT` (one process) for comparison.

    python benchmarks/serve_replicas.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from common import machine, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import LIBRARY_PROMPTS, _free_port, library_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "bench"


def _body(prompt: str, new: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0}


async def _clients(url: str, prompts: list[str], new: int) -> tuple[float, Counter[str]]:
    """len(prompts) greedy requests sent at once: tokens/s over the wall time, and how many each replica answered."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(client.post("/v1/completions", json=_body(p, new)) for p in prompts))
        elapsed = time.perf_counter() - start
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    names = Counter(r.headers.get("x-loramix-replica", "one process") for r in replies)
    return sum(r.json()["usage"]["completion_tokens"] for r in replies) / elapsed, names


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    sys.exit("the server did not answer /health in time")


def start_up(checkpoint: Path, flags: list[str]) -> float:
    """Seconds from launching `loramix serve CKPT FLAGS` until /health answers; the server is stopped after."""
    port = _free_port()
    cmd = [sys.executable, "-m", "loramix", "serve", str(checkpoint), "--port", str(port), "--model-id", MODEL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def throughput(checkpoint: Path, rounds: int, new: int, clients: int, max_batch: int) -> dict[str, list[float]]:
    import ray
    from ray import serve

    from loramix.serve.ray import APP_NAME, ReplicaConfig, deployment

    port = _free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    config = ReplicaConfig(str(checkpoint), model_id=MODEL, threads=1, app={"max_batch": max_batch, "max_queue": 4096})
    prompts = LIBRARY_PROMPTS[:clients]

    one = subprocess.Popen(  # the one-process server, for the cost of Ray's proxy
        [sys.executable, "-m", "loramix", "serve", str(checkpoint), "--port", str(_free_port_one := _free_port()),
         "--model-id", MODEL, "--max-batch", str(max_batch), "--max-queue", "4096", "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    one_url = f"http://127.0.0.1:{_free_port_one}"
    _wait_health(one_url, one)

    def scale(n: int) -> None:
        app = deployment(config=config, replicas=n, num_cpus=1, max_ongoing_requests=max_batch)  # as the CLI does
        serve.run(app, name=APP_NAME, route_prefix="/")
        seen: set[str] = set()
        deadline = time.time() + 120
        while len(seen) < n and time.time() < deadline:  # every replica warmed up (and counted) before timing
            seen |= set(asyncio.run(_clients(url, prompts[:4], 8))[1])

    rows: dict[str, list[float]] = {"one process (no Ray)": [], "1 replica": [], "2 replicas": []}
    split = ""
    try:
        asyncio.run(_clients(one_url, prompts, 8))  # warm up
        for r in range(rounds):
            order = [1, 2] if r % 2 == 0 else [2, 1]
            rows["one process (no Ray)"].append(asyncio.run(_clients(one_url, prompts, new))[0])
            for n in order:
                scale(n)
                tps, names = asyncio.run(_clients(url, prompts, new))
                assert len(names) <= n, names
                rows[f"{n} replica{'s' if n > 1 else ''}"].append(tps)
                if n == 2:
                    split = "/".join(str(c) for c in sorted(names.values(), reverse=True))
            line = ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items())
            print(f"round {r + 1}: {line}; requests per replica with 2: {split}", flush=True)
    finally:
        one.terminate()
        one.wait(timeout=60)
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=96, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8, help="each server's --max-batch (loramix serve's default)")
    parser.add_argument("--start-ups", type=int, default=2, help="start-up measurements of each server")
    args = parser.parse_args()
    print(f"machine: {machine()}; 1 torch thread per replica; load average before {os.getloadavg()}")
    checkpoint = library_checkpoint(workdir())  # removed when the script exits

    rows = throughput(checkpoint, args.rounds, args.new, args.clients, args.max_batch)
    base = rows["1 replica"]
    print(f"\n{args.clients} concurrent clients, greedy, {args.new} new tokens, --max-batch {args.max_batch}, "
          f"{args.rounds} interleaved rounds (medians)\n")  # fmt: skip
    print("| server | tokens/s | vs 1 replica (median of per-round ratios) |\n|---|---|---|")
    for name, values in rows.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"| {name} | {statistics.median(values):.1f} | {ratio:.2f}x |")
    print(f"load average after the throughput runs: {os.getloadavg()}")

    starts = {"loramix serve (one process)": [], "loramix serve --replicas 2": []}
    for _ in range(args.start_ups):
        starts["loramix serve (one process)"].append(start_up(checkpoint, []))
        starts["loramix serve --replicas 2"].append(start_up(checkpoint, ["--replicas", "2"]))
    print("\n| start-up, launch to /health answering | seconds (each run) |\n|---|---|")
    for name, values in starts.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} |")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
