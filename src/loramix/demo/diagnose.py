"""Why a gate does not generalise: the figures of docs/demo.md's diagnosis, for one checkpoint on the demo's test
subset and on the held-out set (`loramix.demo.heldout`).

- granular against the oracle on both sets (how much of the gap is the gate: the oracle uses the same experts);
- forward's MAE per held-out peptide family;
- where composite prompts fail: the GRAVY part (segment 1 within 0.25 of the truth) or the verdict part (segment 2
  right for the model's own GRAVY);
- routing on the reference answers (teacher-forced): the entropy of each token's layer-averaged scalings, and the
  share of answer positions whose dominant expert is the record's own (composite: forward for the number, compare
  for the verdict), on prompt and answer positions separately.

`python -m loramix.demo.diagnose CKPT OUT.json [--temperature T] [--heldout-seed N]` runs it for the mini-world
(--heldout-seed: another held-out set of the same make, a confirmation set for a recipe chosen on the default one).
`python -m loramix.demo.diagnose --smollm2 HELDOUT.jsonl OUT.json [--checkpoint DIR]` does the same for the shipped
SmolLM2 mixture (or a checkpoint of it, e.g. `loramix demo --model smollm2 --export DIR`'s) on its test subset and a
chat-phrased held-out file (`python -m loramix.demo.heldout DIR --smollm2`), and adds the chat NLL of the base's own
answers over the base's (about 45 minutes at 1 thread).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from ..analysis.stats import token_entropy

__all__ = ["composite_parts", "diagnose", "diagnose_smollm2", "routing"]


def composite_parts(records: list[dict[str, Any]], answers: list[str]) -> dict[str, float]:
    """Shares of composite answers: GRAVY part right (within 0.25), verdict right for the model's own number, both."""
    from ..scoring import parse_number
    from .scoring import DESIGN_TOLERANCE, second_segment

    n = len(records)
    gravy_ok = verdict_ok = both = 0
    for r, a in zip(records, answers):
        first_text, _, rest = a.partition(r["then"])
        first = parse_number(first_text)
        if first is None:
            continue
        g = abs(first - float(r["first"])) <= DESIGN_TOLERANCE
        v = rest.strip() == second_segment(r["then"], first)
        gravy_ok += g
        verdict_ok += v
        both += g and v
    return {"gravy_part": gravy_ok / n, "verdict_part": verdict_ok / n, "solved": both / n}


@torch.no_grad()
def routing(model: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Routing over each record's prompt + reference completion: mean entropy (nats; ln N is uniform) on prompt and
    answer positions, the share of answer positions routed mainly to the record's expert, and the dominant experts
    of the answer positions."""
    tok = model.tokenizer
    names = model.expert_names
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    dominant: Counter[str] = Counter()
    for r in records:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        full = tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full], device=model.device)
        s = model.compute_scalings(ids, torch.ones_like(ids))[0].float()  # [T, L, N]
        h = token_entropy(s)
        top = s.mean(1).argmax(-1)
        n_prompt = len(prompt)
        answer = range(n_prompt - 1, len(full) - 1)  # positions that predict an answer token
        sums["prompt_entropy"] += float(h[: n_prompt - 1].sum())
        counts["prompt_entropy"] += n_prompt - 1
        if r["domain"] == "composite":  # the number is forward's, the verdict (after "?") compare's
            cut = len(tok(r["prompt"] + r["completion"].split("?")[0] + "?", add_special_tokens=False)["input_ids"])
            wanted = ["forward" if p < cut - 1 else "compare" for p in answer]
        else:
            wanted = [r["domain"]] * len(answer)
        for p, w in zip(answer, wanted):
            sums["answer_entropy"] += float(h[p])
            counts["answer_entropy"] += 1
            dominant[names[int(top[p])]] += 1
            sums["own_expert"] += float(names[int(top[p])] == w)
            counts["own_expert"] += 1
    out: dict[str, Any] = {k: sums[k] / counts[k] if counts[k] else math.nan for k in counts}
    total = sum(dominant.values())
    out["dominant_on_answers"] = {k: v / total for k, v in dominant.most_common()}
    return out


def _family_mae(records: list[dict[str, Any]], answers: list[str]) -> dict[str, float]:
    from ..scoring import parse_number

    errors: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(records, answers):
        x = parse_number(a)
        errors[r.get("family", "all")].append(abs(x - r["answer"]) if x is not None else math.nan)
    return {f: sum(e for e in v if math.isfinite(e)) / max(1, sum(math.isfinite(e) for e in v)) for f, v in
            errors.items()}


def diagnose(model: Any, sets: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The figures above for each named set of records (e.g. {"test": ..., "heldout": ...})."""
    from ..evaluate import evaluate

    out: dict[str, Any] = {}
    for name, records in sets.items():
        result = evaluate(model, records, systems=("oracle", "granular"), progress=False)
        by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_domain[r["domain"]].append(r)
        entry: dict[str, Any] = {
            "primary": {s: {d: result.primary(s, d) for d in result.kinds} for s in result.metrics},
            "granular_over_oracle": {
                d: result.primary("granular", d) / result.primary("oracle", d)
                if result.primary("oracle", d) > 0
                else math.nan
                for d in result.kinds
            },
        }
        if "composite" in by_domain:
            entry["composite_parts"] = {
                s: composite_parts(by_domain["composite"], result.answers[f"{s}/composite"])
                for s in ("granular", "oracle")
            }
        if "forward" in by_domain:
            entry["forward_mae_by_family"] = {
                s: _family_mae(by_domain["forward"], result.answers[f"{s}/forward"]) for s in ("granular", "oracle")
            }
        entry["routing"] = {d: routing(model, recs[:100]) for d, recs in by_domain.items()}
        out[name] = entry
    return out


def diagnose_smollm2(mix: Any, heldout: list[dict[str, Any]], sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """`diagnose` of a SmolLM2 mixture (`smollm2_run.load_mixtures`) on the demo's test subset (`sizes`, default the
    demo's) and the `heldout` records, each set with the chat NLL of the base's own answers under granular over the
    base's (docs/demo-smollm2.md)."""
    from .chat_world import ChatWorld
    from .smollm2_run import SMOLLM2_EVAL_SIZES, read_references, retention, smollm2_weights

    world = ChatWorld(mix.tokenizer, read_references(smollm2_weights() / "chat_references.jsonl"))
    sets = {
        "test": [r for d, n in (sizes or SMOLLM2_EVAL_SIZES).items() for r in world.domain_records(d, "test", n)],
        "heldout": heldout,
    }
    result = diagnose(mix, sets)
    for name, records in sets.items():
        chat = [r for r in records if r["domain"] == "chat"]
        if chat:
            nll = retention(mix, None, chat, ["base", "granular"])
            result[name]["chat_nll_over_base"] = nll["granular"] / nll["base"]
    return result


def _pop_option(args: list[str], flag: str, parse: Any, what: str) -> Any:
    """`flag VALUE` taken out of args and parsed (None when absent); a missing or unparsable value stops with
    "FLAG needs WHAT"."""
    if flag not in args:
        return None
    i = args.index(flag)
    try:
        value = parse(args[i + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"{flag} needs {what}") from None
    del args[i : i + 2]
    return value


def main(argv: list[str] | None = None) -> None:
    from ..loading import load
    from .heldout import HELDOUT_SEED, heldout_records
    from .run import test_records
    from .world import World

    args = list(sys.argv[1:] if argv is None else argv)
    if "--smollm2" in args:
        # a loramix checkpoint of the SmolLM2 mixture (e.g. `--export`'s) instead of the shipped parts
        checkpoint = _pop_option(args, "--checkpoint", str, "a loramix checkpoint directory")
        i = args.index("--smollm2")
        if i + 1 >= len(args) or len(args) != 3:
            raise SystemExit("usage: python -m loramix.demo.diagnose --smollm2 HELDOUT.jsonl OUT.json "
                             "[--checkpoint DIR]")
        heldout = args.pop(i + 1)
        args.pop(i)
        from .heldout import load_heldout
        from .smollm2_run import load_mixtures

        mix = load(checkpoint) if checkpoint is not None else load_mixtures(truncated=False)[0]
        result = diagnose_smollm2(mix, load_heldout(heldout))
        Path(args[0]).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=1))
        return
    # the gate's softmax temperature replaced (0.001: an argmax per token and layer)
    temperature = _pop_option(args, "--temperature", float, "a number (e.g. 0.001)")
    seed = _pop_option(args, "--heldout-seed", int, f"an integer (the default set's is {HELDOUT_SEED})")
    seed = HELDOUT_SEED if seed is None else seed
    if len(args) != 2:
        raise SystemExit("usage: python -m loramix.demo.diagnose CHECKPOINT OUT.json [--temperature T] "
                         "[--heldout-seed N]")
    model = load(args[0])
    if temperature is not None:
        model.gate.config = dataclasses.replace(model.gate.config, temperature=temperature)
    world = World()
    result = diagnose(model, {"test": test_records(world), "heldout": heldout_records(seed=seed, world=world)})
    Path(args[1]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
