"""Start-up of a compiled `generate` on the CPU, with a cold and then a warm compile cache (issue 41).

    python benchmarks/compile_start.py --model smollm2 --threads 2         # SmolLM2-135M, 4 experts (profile_step.py)
    python benchmarks/compile_start.py --model tiny --new-tokens 3         # a smoke run

Each start is a fresh process (nothing compiled in memory) that builds the mixture, then calls
`generate(..., compile=True)` on a 1-token prompt; it reports the seconds from that call to its first and second new
token (the first comes from the prompt's forward; the first decode step, which compiles, gives the second) and to
the last of --new-tokens. The first start runs with an empty inductor cache directory (TORCHINDUCTOR_CACHE_DIR, a
fresh temporary folder), the second with the folder the first one filled: what a user's second start sees (by
default inductor keeps its cache under the system's temporary folder, torchinductor_<user>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(args.threads)
    from profile_step import build

    mix = build(args.model)
    stamps: list[float] = []

    class Streamer:
        def put(self, value) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([[1]])
    start = time.perf_counter()
    mix.generate(
        ids, max_new_tokens=args.new_tokens, mode=args.mode, eos_token_id=[], compile=True, streamer=Streamer()
    )
    end = time.perf_counter()
    # stamps[0]: the prompt; then one per new token
    print(json.dumps({"first": stamps[1] - start, "second": stamps[2] - start, "total": end - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "25m", "tiny"])
    parser.add_argument("--mode", default="granular", choices=["granular", "prompt"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3")
    if args.child:
        return child(args)
    cache = Path(tempfile.mkdtemp(prefix="loramix-inductor-cache-"))
    try:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        command = [sys.executable, __file__, "--child", *sys.argv[1:]]
        out = {}
        for start in ("cold cache", "warm cache"):
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(result.stderr[-3000:])
            out[start] = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(
        f"{args.model}, mode {args.mode}, generate(compile=True), {args.threads} threads, {args.new_tokens} new tokens"
    )
    print("| start | first token (s) | second token: first decode step, compiled (s) | all tokens (s) |")
    print("|---|---|---|---|")
    for name, t in out.items():
        print(f"| {name} | {t['first']:.1f} | {t['second']:.1f} | {t['total']:.1f} |")
    cold, warm = out["cold cache"]["second"], out["warm cache"]["second"]
    print(f"\nthe warm cache starts decoding {cold / warm:.1f}x sooner ({cold:.1f} s -> {warm:.1f} s)")


if __name__ == "__main__":
    main()
