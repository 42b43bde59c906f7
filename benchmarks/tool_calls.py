"""Tool calls in tool_choice "auto" on the protein tool set (loramix.demo.tool_world: 48 prompts, four tools, 8 of
them plain-text questions), on the SmolLM2 export, greedy: the share of prompts answered with the right tool (or in
text), the share of emitted calls whose arguments validate, and the share with the expected arguments, for the
mixture (the trained gate) and the base model (every scaling 0, as `loramix eval`'s base), strict and not.

Each prompt is what the server renders for a request with the four tools and no tool_choice (serve/tools.py: the
export's chat template does not read tools, so the default tool prompt, SmolLM2's `<tool_call>[...]</tool_call>`
list form); strict rows carry the server's lazy grammar (`ToolPlan.lazy_grammar`); the answers are read by the
server's parser (`toolparsers.parse_calls`). With `--cost`, also the cost of strict mode: 16 rows, 8 of them
strict tool rows and 8 plain chat rows, against the same 16 rows without tools (tokens/s, interleaved), and whether
the 8 plain rows give the same tokens in both.

    loramix demo --model smollm2 --export /tmp/smollm2-mix
    python benchmarks/tool_calls.py /tmp/smollm2-mix --threads 2 [--cost]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _setup(checkpoint: str):
    import loramix

    model = loramix.load(checkpoint)
    model.eval()
    return model


def _rendered(model, record, mode: str):
    from loramix.demo.tool_world import TOOLS
    from loramix.serve.schemas import ChatRequest
    from loramix.serve.tools import chat_messages, plan_tools, template_reads_tools
    from loramix.text import render_chat

    tools = [{**t, "function": {**t["function"], "strict": mode == "strict"}} for t in TOOLS]
    choice = "required" if mode == "required" else None
    body = ChatRequest(
        model="m", messages=[{"role": "user", "content": record["prompt"]}], tools=tools, tool_choice=choice
    )
    plan = plan_tools(body, model.tokenizer, None)
    templated = template_reads_tools(model.tokenizer)
    text = render_chat(
        model.tokenizer, chat_messages(body.messages, plan, templated), tools=tools if templated else None
    )
    return plan, text


def _answers(model, records, mode: str, base: bool, max_new: int):
    from loramix.evaluate import _fixed
    from loramix.grammar import Grammar
    from loramix.serve.toolparsers import parse_calls
    from loramix.text import encode_prompts

    plans, texts = zip(*(_rendered(model, r, mode) for r in records))
    grammar = None
    if mode == "required":
        grammar = Grammar.for_model(model, plans[0].schema())
    if mode == "strict":
        special = set(model.tokenizer.all_special_ids)

        def token(text):
            ids = model.tokenizer.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 and ids[0] in special else None

        grammar = Grammar.lark_for_model(model, plans[0].lazy_grammar(token))
    ids, mask = encode_prompts(model.tokenizer, list(texts), templated=True)
    kwargs = {"max_new_tokens": max_new}
    if base:
        kwargs["scalings"] = _fixed(model, torch.zeros(len(records), len(model.expert_names)))
    if grammar is not None:
        kwargs["grammar"] = grammar
    start = time.perf_counter()
    out = model.generate(ids, mask, **kwargs)
    seconds = time.perf_counter() - start
    results = []
    for row, plan in enumerate(plans):
        text = model.tokenizer.decode(out.new_tokens[row, : out.lengths[row]].tolist(), skip_special_tokens=True)
        if mode == "required":
            try:
                calls = [(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
            except json.JSONDecodeError:  # cut by max_new
                calls = []
        else:
            _content, calls = parse_calls(plan.parser, plan.names, text)
        results.append((text, calls))
    return results, seconds


DEFAULT_RUNS = ("loramix:strict", "loramix:plain", "base:strict", "base:plain")


def quality(model, max_new: int, batch: int, only: list[str] | None = None) -> dict:
    from loramix.demo.tool_world import prompts, score

    records = prompts()
    table = {}
    for system in ("loramix", "base"):
        for mode in ("strict", "plain", "required"):
            if (only or ["loramix:strict", "loramix:plain", "base:strict", "base:plain"]).count(
                f"{system}:{mode}"
            ) == 0:
                continue
            rows, samples = [], []
            chosen = [r for r in records if r["tool"] is not None] if mode == "required" else records
            for start in range(0, len(chosen), batch):
                chunk = chosen[start : start + batch]
                answers, seconds = _answers(model, chunk, mode, system == "base", max_new)
                print(f"  {system} {mode} rows {start}..{start + len(chunk)}: {seconds:.0f} s", flush=True)
                for record, (text, calls) in zip(chunk, answers):
                    rows.append({**score(record, calls), "calls": len(calls), "tool": record["tool"]})
                    if len(samples) < 3:
                        samples.append({"prompt": record["prompt"], "answer": text})
            tool_rows = [r for r in rows if r["tool"] is not None]
            emitted = [r for r in rows if r["calls"]]
            key = f"{system} {mode}"
            table[key] = {
                "right_tool": sum(r["right_tool"] for r in rows) / len(rows),
                "right_tool_of_tool_prompts": sum(r["right_tool"] for r in tool_rows) / len(tool_rows),
                "text_prompts_in_text": sum(r["right_tool"] for r in rows if r["tool"] is None)
                / max(sum(r["tool"] is None for r in rows), 1),
                "answers_with_calls": len(emitted),
                "calls_valid": (sum(r["valid"] for r in emitted) / len(emitted)) if emitted else None,
                "right_arguments": sum(r["right_arguments"] for r in tool_rows) / len(tool_rows),
                "samples": samples,
            }
            print(key, json.dumps({k: v for k, v in table[key].items() if k != "samples"}), flush=True)
    return table


def cost(model, max_new: int, rounds: int) -> dict:
    """16 rows: 8 strict tool rows + 8 plain rows, against the same 16 prompts without tools (tokens/s)."""
    from loramix.demo.tool_world import prompts
    from loramix.grammar import Grammar
    from loramix.text import encode_prompts, render_chat

    records = [r for r in prompts() if r["tool"] is not None][:8]
    plain = [
        render_chat(model.tokenizer, [{"role": "user", "content": f"Tell me about protein number {i}."}])
        for i in range(8)
    ]
    plans, tool_texts = zip(*(_rendered(model, r, "strict") for r in records))
    grammar = Grammar.lark_for_model(model, plans[0].lazy_grammar(lambda _: None))
    bare = [render_chat(model.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    with_tools = encode_prompts(model.tokenizer, list(tool_texts) + plain, templated=True)
    without = encode_prompts(model.tokenizer, bare + plain, templated=True)
    ratios, same = [], True
    for _ in range(rounds):
        timings = {}
        for name, (ids, mask), grammars in (
            ("tools", with_tools, [grammar] * 8 + [None] * 8),
            ("none", without, None),
        ):
            start = time.perf_counter()
            # no row stops (an id that is never written ends them): every variant runs 16 x max_new tokens
            never = model.model.get_output_embeddings().weight.shape[0] - 1
            out = model.generate(ids, mask, max_new_tokens=max_new, grammar=grammars, eos_token_id=never)
            timings[name] = (out.lengths.sum().item() / (time.perf_counter() - start), out)
        ratios.append(timings["tools"][0] / timings["none"][0])
        a, b = timings["tools"][1], timings["none"][1]
        same &= bool(torch.equal(a.new_tokens[8:], b.new_tokens[8:]))
    ratios.sort()
    return {"ratio_median": ratios[len(ratios) // 2], "ratios": ratios, "plain_rows_same_tokens": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--only",
        nargs="*",
        help="what to run, of loramix:strict loramix:plain base:strict base:plain (the default: these four), "
        "loramix:required base:required (tool_choice required, the 40 tool prompts only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _setup(args.checkpoint)
    result = {"quality": quality(model, args.max_new, args.batch, args.only)}
    if args.cost:
        result["cost"] = cost(model, args.max_new, args.rounds)
        print("cost", json.dumps(result["cost"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
