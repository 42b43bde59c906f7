"""The library's `generate` of this checkout against another checkout's (e.g. main before the one decoder).

Both run in child processes, alternately (before, after, before, after ...), each on the same checkpoint (the ~25M
Llama of issue "one decoder": hidden 512, 8 layers, 4 rank-8 experts on q/k/v/o, no EOS), greedy, 96 new tokens,
prompts of 30 characters, torch threads fixed; a child times batch 1 and batch 16 after one warm-up call of each
(the compile, with --compile). Prints the medians and after / before.

    python benchmarks/decoder_vs.py --before /path/to/old/src --threads 1 --rounds 3
    python benchmarks/decoder_vs.py --before /path/to/old/src --threads 1 --rounds 3 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

SRC = Path(__file__).resolve().parents[1] / "src"


def child(checkpoint: str, compile_: bool, new: int) -> None:
    import torch

    import loramix
    from loramix.text import encode_prompts
    from serve_load import LIBRARY_PROMPTS

    model = loramix.load(checkpoint)
    out = {}
    for batch in (1, 16):
        ids, mask = encode_prompts(model.tokenizer, LIBRARY_PROMPTS[:batch])
        kwargs = dict(max_new_tokens=new, compile=True) if compile_ else dict(max_new_tokens=new)
        with torch.no_grad():
            model.generate(ids, mask, **kwargs)  # warm up (and compile)
            start = time.perf_counter()
            result = model.generate(ids, mask, **kwargs)
            out[batch] = result.new_tokens.numel() / (time.perf_counter() - start)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="src/ of the checkout to compare against")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child(args.child, args.compile, args.new_tokens)
        return
    if args.before is None:
        parser.error("--before SRC is required")
    from serve_load import library_checkpoint

    print(f"machine: {machine()}; torch threads {args.threads}; load average {os.getloadavg()}")
    checkpoint = library_checkpoint(Path(tempfile.mkdtemp(prefix="decoder_vs_")))
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, src in (("before", args.before), ("after", SRC)):
            env = {
                **os.environ,
                "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}",
                "OMP_NUM_THREADS": str(args.threads),
            }
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(checkpoint),
                "--threads",
                str(args.threads),
                "--new-tokens",
                str(args.new_tokens),
                *(["--compile"] if args.compile else []),
            ]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"the {name} child failed: {result.stderr[-2000:]}")
            runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"| generate{' (compile=True)' if args.compile else ''} | before tokens/s | after tokens/s | after / before |"
    )
    print("|---|---|---|---|")
    for batch in ("1", "16"):
        before = statistics.median(r[batch] for r in runs["before"])
        after = statistics.median(r[batch] for r in runs["after"])
        print(f"| batch {batch} | {before:.1f} | {after:.1f} | {after / before:.2f}x |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
