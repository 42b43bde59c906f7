"""The cost of strict tool_choice "auto" in the decoder: a batch of 16 rows, 8 of them carrying the lazy tool-call
grammar of the protein tool set (loramix.demo.tool_world, the server's `ToolPlan.lazy_grammar`, SmolLM2's
`<tool_call>[...]</tool_call>` form), against the same 16 rows with no grammar; and whether the 8 rows without tools
give the same tokens in both.

Model: the ~25M random Llama of the other benchmarks with SmolLM2-135M's byte-level BPE tokenizer (49,152 tokens), as
benchmarks/structured.py. Two strict variants: "waiting" rows, before the trigger (a random model never writes
`<tool_call>`: the grammar's mask is computed every step and allows everything), and "calling" rows, whose grammar
state starts just after `<tool_call>\\n` (every step is inside a call, under the tools' JSON schemas). Every row
yields a token every step (the decoder does not stop rows). Interleaved rounds; both wall time and the process's
CPU time are reported (with one torch thread, CPU time is the work done, which other jobs on the machine disturb
less than wall time).

    python benchmarks/tool_cost.py --threads 1 --rounds 5 --steps 64 [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from structured import PROMPTS, smollm2_tokenizer

from common import build_base, build_experts, machine, workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: SmolLM2's GGUF file)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import loramix
    from loramix.decode import Decoder, RowSpec
    from loramix.demo.tool_world import TOOLS
    from loramix.grammar import Grammar
    from loramix.serve.schemas import ChatRequest
    from loramix.serve.tools import plan_tools
    from loramix.text import encode_prompts

    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = smollm2_tokenizer(None)
    vocab = 49152
    root = workdir()
    base = build_base(root, vocab_size=vocab)
    experts = build_experts(base, root, n=4, rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(), tokenizer=tokenizer)
    eos = (tokenizer.eos_token_id,)
    tools = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    plan = plan_tools(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=tools), tokenizer)
    start = time.perf_counter()
    waiting = Grammar.lark(tokenizer, plan.lazy_grammar(lambda _: None), vocab=vocab, eos=eos)
    compile_s = time.perf_counter() - start
    state = waiting.matcher()
    assert state.consume_tokens(tokenizer.encode("<tool_call>\n", add_special_tokens=False))
    calling = dataclasses.replace(waiting, _prototype=state)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    strict_rows = set(range(0, 16, 2))

    def run(grammar) -> torch.Tensor:
        decoder = Decoder(model, 16, -(-(ids.shape[1] + args.steps + 1) // 64) * 64, eos=eos)
        decoder.place(ids.shape[1], args.steps)
        specs = [
            RowSpec(max_new_tokens=args.steps + 1, grammar=grammar if i in strict_rows else None) for i in range(16)
        ]
        tokens = []
        with torch.no_grad():
            decoder.join(list(range(16)), ids, mask, specs)
            for _ in range(args.steps):
                tokens.append(decoder.step().tokens.clone())
        assert not decoder.grammar_failures, decoder.grammar_failures
        return torch.stack(tokens, 1)

    variants = {"no tools": None, "8 rows strict, waiting": waiting, "8 rows strict, calling": calling}
    print(f"machine: {machine()}, threads {args.threads}, load average before {os.getloadavg()}")
    reference = run(None)
    for grammar in variants.values():  # warm-up
        run(grammar)
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    same = True
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            tokens = run(variants[name])
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            free = [i for i in range(16) if i not in strict_rows]
            same &= bool(torch.equal(tokens[free], reference[free]))
    tokens = 16 * args.steps
    summary = {
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "grammar_compile_s": round(compile_s, 3),
        "rows_without_tools_same_tokens": same,
        "load_average_after": os.getloadavg(),
    }
    for name in variants:
        summary[name] = {
            "wall_tokens_per_s": round(tokens / statistics.median(wall[name]), 1),
            "wall_ratio": round(statistics.median(b / t for t, b in zip(wall[name], wall["no tools"])), 3),
            "cpu_tokens_per_s": round(tokens / statistics.median(cpu[name]), 1),
            "cpu_ratio": round(statistics.median(b / t for t, b in zip(cpu[name], cpu["no tools"])), 3),
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
