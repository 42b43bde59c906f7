"""Load test of `loramix serve` on loopback, as a user would see it (OpenAI /v1/completions over httpx).

Servers, each started in a subprocess on a free port with fixed torch threads:
    continuous      this checkout: continuous batching over --max-batch slots
    one-at-a-time   --no-batching of the server given by --today-src (the previous server), or of this one
    today           the previous server (--today-src: a checkout's src/, e.g. main before issue 18) with --batching:
                    it runs the waiting requests with equal settings as one batch until every row is done

Scenarios (--scenarios):
    poisson       open-loop Poisson arrivals at --rates requests/s for --duration s each, streaming, mixed lengths
                  (max_tokens drawn from --lengths, EOS biased out so every request runs to its length): throughput,
                  p50/p99 time to first token, p50/p99 per-token latency (after the first), errors
    short         4 streaming requests of 300 tokens running, then 8 requests of 4 tokens: the short ones' p50
                  latency against the same 8 on an idle server
    throughput    --requests requests at --concurrency clients, closed loop, the demo's prompts, greedy, max_tokens
                  32 (the demo checkpoint's answers end with EOS after a few tokens): tokens/s, errors, server RSS
    hangup        24 streaming clients of 300 tokens hang up after 1 s; then one 4-token request: its latency
                  against the idle latency
    body          a 10 MB JSON body: time to the refusal, server RSS before and after
    library       (alone) the server against the library on the ~25M Llama of issue "one decoder": generate at
                  batch 1 and 16 and the server at 1 and 16 concurrent clients, greedy, 96 tokens, interleaved

The poisson, short and hangup scenarios need 300 tokens of context: they run on a tiny random Llama (4 layers,
hidden 128, context 512, the demo's tokenizer, 3 random experts, a random gate) built in a temporary directory;
throughput runs on the demo checkpoint (context 96) as in the earlier runs.

    python benchmarks/serve_load.py --today-src /path/to/main/src --threads 1
    python benchmarks/serve_load.py --scenarios library --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from common import build_base, build_experts, machine

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
NO_EOS = {"2": -100}  # the demo tokenizer's </s>: requests run to max_tokens
SRC = Path(__file__).resolve().parents[1] / "src"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _q(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float, stderr: Callable[[], str]) -> None:
    """Poll `url`/health until it answers 200 (at most `seconds`); exit with the server's stderr if it died."""
    for _ in range(int(seconds * 10)):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited: {stderr()[-2000:]}")
        time.sleep(0.1)


class Served:
    """`loramix serve CKPT` in a subprocess from the source tree `src`."""

    def __init__(self, checkpoint: Path, src: Path, flags: list[str], threads: int) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "loramix", "serve", str(checkpoint), "--port", str(self.port)]
        cmd += ["--log-level", "warning", "--model-id", "bench", "--max-tokens", "400", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.proc, self.url, 120, lambda: self.proc.stderr.read())
        for _ in range(3):  # warm up
            httpx.post(self.url + "/v1/completions", json=_body("warm up", 8), timeout=120)

    @property
    def rss(self) -> float:
        return _rss_mb(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _body(prompt: str, max_tokens: int, stream: bool = False, no_eos: bool = True) -> dict:
    """A greedy request that runs to max_tokens: EOS is biased away (no_eos), or else ignored (vLLM's ignore_eos: the
    benchmark models' configs name no EOS, but the server takes the tokenizer's)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if no_eos:
        body["logit_bias"] = NO_EOS
    else:
        body["ignore_eos"] = True
    return body


async def _streamed(client: httpx.AsyncClient, body: dict, hang_up_after: float | None = None) -> dict:
    """One streaming request: time to first token, per-token latency after it, tokens (pieces), or an error."""
    start = time.perf_counter()
    first = None
    pieces = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    pieces += 1
                    if first is None:
                        first = time.perf_counter()
                if hang_up_after is not None and time.perf_counter() - start > hang_up_after:
                    return {"hung_up": True}
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    end = time.perf_counter()
    if first is None:
        return {"error": "no tokens"}
    return {
        "ttft": first - start,
        "per_token": (end - first) / max(pieces - 1, 1),
        "tokens": pieces,
        "start": start,
        "end": end,
    }


async def _latency(client: httpx.AsyncClient, body: dict) -> float:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start


# ---------------------------------------------------------------------- scenarios


async def poisson(url: str, rate: float, duration: float, lengths: list[int], seed: int = 0) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        begin = time.perf_counter()
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at > duration:
                break
            await asyncio.sleep(max(0.0, begin + at - time.perf_counter()))
            body = _body(rng.choice(PROMPTS), rng.choice(lengths), stream=True)
            tasks.append(asyncio.create_task(_streamed(client, body)))
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if "ttft" in r]
    span = max(r["end"] for r in ok) - begin if ok else float("nan")
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / span,
        "ttft_p50": _q([r["ttft"] for r in ok], 0.5),
        "ttft_p99": _q([r["ttft"] for r in ok], 0.99),
        "tpot_p50": _q([r["per_token"] for r in ok if r["tokens"] > 1], 0.5),
        "tpot_p99": _q([r["per_token"] for r in ok if r["tokens"] > 1], 0.99),
    }


async def short_behind_long(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        idle = [await _latency(client, _body(PROMPTS[i], 4)) for i in range(8)]
        longs = [asyncio.create_task(_streamed(client, _body(PROMPTS[i], 300, stream=True))) for i in range(4)]
        await asyncio.sleep(0.5)  # the long ones are running
        loaded = await asyncio.gather(*(_latency(client, _body(PROMPTS[i], 4)) for i in range(8)))
        await asyncio.gather(*longs)
    return {"idle_p50": statistics.median(idle), "loaded_p50": statistics.median(loaded)}


async def throughput(url: str, n: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int) -> None:
            nonlocal tokens, errors
            async with sem:
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=_body(PROMPTS[i % len(PROMPTS)], 32, no_eos=False))
                except httpx.HTTPError:
                    errors += 1
                    return
                if r.status_code != 200:
                    errors += 1
                    return
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    return {
        "ok": len(latencies),
        "errors": errors,
        "tokens_per_s": tokens / elapsed,
        "p50": _q(latencies, 0.5),
        "p99": _q(latencies, 0.99),
        "wall": elapsed,
    }


async def hangup(url: str, clients: int = 24) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=100)) as client:
        idle = statistics.median([await _latency(client, _body(PROMPTS[i], 4)) for i in range(5)])
        gone = [_streamed(client, _body(PROMPTS[i % 8], 300, stream=True), hang_up_after=1.0) for i in range(clients)]
        await asyncio.gather(*gone)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:  # fresh connections
        after = await _latency(client, _body(PROMPTS[0], 4))
    return {"idle": idle, "after": after}


def body_refusal(url: str, port: int, rss: callable) -> dict:
    """A 10 MB JSON body: (1) raw socket, the head and the first 64 KiB sent, time until the response's first bytes
    (what the server takes to refuse); (2) httpx posting all of it, time until the response (includes the upload)."""
    big = json.dumps({"model": "bench", "prompt": "x" * (10 * 1024 * 1024)}).encode()
    before = rss()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(big)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.perf_counter()
        s.sendall(head.encode() + big[: 64 * 1024])
        try:
            status = s.recv(64).split(b" ")[1].decode()
            first = time.perf_counter() - start
        except TimeoutError:  # it waits for the rest of the body
            status, first = "none in 10 s", float("nan")
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=600)
    full = time.perf_counter() - start
    time.sleep(0.5)
    return {
        "status": f"{status}/{r.status_code}",
        "first": first,
        "full": full,
        "rss_before": before,
        "rss_after": rss(),
    }


# ---------------------------------------------------------------------- server against the library


LIBRARY_PROMPTS = [
    f"GRAVY<{p}>="
    for p in (
        "GLWSKIKEVGKEAAKAAAKAAG",
        "YVPLPNVPQPGRRPFPTFPGQG",
        "MKTAYIAKQRQISFVKSHFSRQ",
        "ACDEFGHIKLMNPQRSTVWYAC",
        "KKLLMMNNPPQQRRSSTTVVWW",
        "GAVLIPFMWSTCYNQDEKRHGA",
        "WWYYFFLLIIVVMMAACCGGPP",
        "DESIGNPEPTIDEACDKLMNPQ",
        "RRKKHHDDEESSTTNNQQGGAA",
        "PPGGAAVVLLIIMMFFWWYYCC",
        "STNQCGPAVLIMFYWHKRDEST",
        "QWERTYIPASDFGHKLCVNMQW",
        "MNPQRSTVWYACDEFGHIKLMN",
        "LIVFMWYCAGPSTNQDEKRHLL",
        "HKRDESTNQCGPAVLIMFYWHK",
        "AAAAKKKKLLLLEEEEGGGGWW",
    )
]  # 30 characters each


def library_checkpoint(root: Path) -> Path:
    """The ~25M-parameter random Llama (hidden 512, 8 layers), 4 rank-8 experts on q/k/v/o, the demo's tokenizer,
    no EOS (every request runs to its max_tokens)."""
    from transformers import AutoTokenizer

    import loramix
    from loramix.demo import shipped_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(shipped_checkpoint() / "tokenizer")
    base = build_base(root, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    experts = build_experts(base, root, n=4, rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(), tokenizer=tokenizer)
    return model.save(root / "library-checkpoint", include_base=True)


async def _clients(url: str, prompts: list[str], new: int) -> float:
    """len(prompts) greedy requests sent at once; tokens/s over the wall time."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(client.post("/v1/completions", json=_body(p, new, no_eos=False)) for p in prompts)
        )
        elapsed = time.perf_counter() - start
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    return sum(r.json()["usage"]["completion_tokens"] for r in replies) / elapsed


def server_vs_library(
    src: Path, threads: int, rounds: int, new: int = 96, clients: int = 16, today: Path | None = None
) -> dict:
    """tokens/s of the library's `generate` at batch 1 and `clients` (one left-padded call) and of `loramix serve
    --max-batch clients` at 1 and `clients` concurrent clients, interleaved over `rounds` rounds (medians); with
    `today` (a previous checkout's src/), that server too, in the same rounds."""
    import torch

    import loramix
    from loramix.text import encode_prompts

    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="serve_vs_library_"))
    checkpoint = library_checkpoint(root)
    model = loramix.load(checkpoint)
    flags = ["--max-batch", str(clients), "--max-queue", "4096"]
    served = Served(checkpoint, src, flags, threads)
    previous = Served(checkpoint, today, flags, threads) if today is not None else None
    prompts = LIBRARY_PROMPTS[:clients]

    def library(batch: int) -> float:
        ids, mask = encode_prompts(model.tokenizer, prompts[:batch])
        start = time.perf_counter()
        out = model.generate(ids, mask, max_new_tokens=new, eos_token_id=[])  # as the server's ignore_eos
        return out.new_tokens.numel() / (time.perf_counter() - start)

    library(clients)  # warm up
    rows: dict[str, list[float]] = {"library 1": [], f"library {clients}": [], "server 1": [], f"server {clients}": []}
    if previous is not None:
        rows |= {"today 1": [], f"today {clients}": []}
    try:
        for _ in range(rounds):
            rows["library 1"].append(library(1))
            rows["server 1"].append(asyncio.run(_clients(served.url, prompts[:1], new)))
            if previous is not None:
                rows["today 1"].append(asyncio.run(_clients(previous.url, prompts[:1], new)))
            rows[f"library {clients}"].append(library(clients))
            rows[f"server {clients}"].append(asyncio.run(_clients(served.url, prompts, new)))
            if previous is not None:
                rows[f"today {clients}"].append(asyncio.run(_clients(previous.url, prompts, new)))
    finally:
        served.close()
        if previous is not None:
            previous.close()
    return {k: statistics.median(v) for k, v in rows.items()}


# ---------------------------------------------------------------------- the random long-context checkpoint


def random_checkpoint(root: Path, **overrides) -> Path:
    """A tiny random Llama with a 512-token context (or as `overrides` say), the demo's tokenizer, 3 random experts,
    a random gate."""
    from transformers import AutoTokenizer

    import loramix
    from loramix.demo import shipped_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(shipped_checkpoint() / "tokenizer")
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base = build_base(root, **{**config, **overrides})
    experts = build_experts(base, root, n=3, rank=4)
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(), tokenizer=tokenizer)
    return model.save(root / "checkpoint", include_base=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--today-src", type=Path, default=None, help="src/ of the previous server (today's rows)")
    parser.add_argument("--scenarios", nargs="+", default=["short", "hangup", "body", "poisson", "throughput"])
    parser.add_argument("--servers", nargs="+", default=["continuous", "today", "one-at-a-time"])
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0, 16.0])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4, 32, 128])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="library: interleaved rounds (medians)")
    args = parser.parse_args()
    if args.scenarios == ["library"]:  # the server against the library, in this process and its server
        print(f"machine: {machine()}; torch threads {args.threads}; load average {os.getloadavg()}")
        r = server_vs_library(SRC, args.threads, args.rounds, today=args.today_src)
        one, many = r["library 1"], r["library 16"]
        print("| | tokens/s | vs the library | vs the previous server (--today-src) |\n|---|---|---|---|")
        print(f"| library generate, batch 1 | {one:.1f} | | |\n| library generate, batch 16 | {many:.1f} | | |")
        for n, lib in ((1, one), (16, many)):
            versus = f"{r[f'server {n}'] / r[f'today {n}']:.2f}x" if f"today {n}" in r else ""
            who = f"{n} client{'s' * (n > 1)}"
            print(f"| serve, {who} | {r[f'server {n}']:.1f} | {r[f'server {n}'] / lib:.2f}x | {versus} |")
            if f"today {n}" in r:
                print(f"| previous serve, {who} | {r[f'today {n}']:.1f} | {r[f'today {n}'] / lib:.2f}x | |")
        print(f"load average after: {os.getloadavg()}")
        return
    from loramix.demo import shipped_checkpoint

    servers = {"continuous": (SRC, ["--max-batch", str(args.max_batch), "--max-queue", "4096"])}
    previous = args.today_src or SRC
    if args.today_src is not None:
        servers["today"] = (args.today_src, ["--batching", "--max-batch", str(args.max_batch)])
    servers["one-at-a-time"] = (previous, ["--no-batching"])
    servers = {k: v for k, v in servers.items() if k in args.servers}
    print(f"machine: {machine()}; server torch threads {args.threads}; load average {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    long_ckpt = random_checkpoint(tmp)
    demo = shipped_checkpoint()
    for scenario in args.scenarios:
        ckpt = demo if scenario == "throughput" else long_ckpt
        print(f"\n### {scenario} ({'demo checkpoint' if ckpt == demo else 'random 512-context Llama'})\n")
        for name, (src, flags) in servers.items():
            if scenario in ("body", "hangup") and name == "one-at-a-time":
                continue
            served = Served(ckpt, src, flags, args.threads)
            try:
                if scenario == "poisson":
                    for rate in args.rates:
                        r = asyncio.run(poisson(served.url, rate, args.duration, args.lengths))
                        print(
                            f"| {name} | {rate:g} req/s | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
                            f"{r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['tpot_p50'] * 1000:.1f} | "
                            f"{r['tpot_p99'] * 1000:.1f} |",
                            flush=True,
                        )
                elif scenario == "short":
                    r = asyncio.run(short_behind_long(served.url))
                    print(f"| {name} | {r['idle_p50']:.3f} | {r['loaded_p50']:.3f} |", flush=True)
                elif scenario == "throughput":
                    before = served.rss
                    r = asyncio.run(throughput(served.url, args.requests, args.concurrency))
                    print(
                        f"| {name} | {r['ok']} | {r['errors']} | {r['tokens_per_s']:.1f} | {r['p50']:.3f} | "
                        f"{r['p99']:.3f} | {r['wall']:.1f} | {before:.0f} | {served.rss:.0f} |",
                        flush=True,
                    )
                elif scenario == "hangup":
                    r = asyncio.run(hangup(served.url))
                    ratio = r["after"] / r["idle"]
                    print(f"| {name} | {r['idle']:.3f} | {r['after']:.3f} | {ratio:.2f}x |", flush=True)
                elif scenario == "body":
                    r = body_refusal(served.url, served.port, lambda s=served: s.rss)
                    print(
                        f"| {name} | {r['status']} | {r['first'] * 1000:.1f} | {r['full'] * 1000:.0f} | "
                        f"{r['rss_before']:.0f} | {r['rss_after']:.0f} |",
                        flush=True,
                    )
            finally:
                served.close()
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
