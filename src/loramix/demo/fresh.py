"""Unlimited training data for the demo's gate: the labels are computable, so every training record can carry a new
peptide (docs/demo.md, "Training recipes, compared on the held-out set").

Fresh peptides are made from the training split only, and never from the held-out generator's families
(`loramix.demo.heldout`), so that the held-out set stays a different distribution:

    mutated      a training peptide with 10-50% of its residues replaced by uniformly drawn ones
    recombined   slices of two training peptides joined, cut to a length drawn uniformly from 8-40
    shuffled     a training peptide's residues in a random order, cut to a random length (at least 8)
    uniform      residues drawn uniformly from the 20, length uniform in 8-40

A fresh peptide that is a validation, test or held-out peptide is drawn again.

`VariedPeptides` widens the stream for training the forward (GRAVY) expert (`forward_expert_records`): lengths
5-50 instead of 8-40, and two more kinds,

    composition  residues drawn from a random composition (Dirichlet, concentration 0.5, over the 20), length 5-50
    uniform      as above, length 5-50

and `expert_data="tilted"` adds

    tilted       residues drawn with probabilities proportional to exp(t * KD(residue)), KD the Kyte-Doolittle
                 hydropathy and t uniform in [-0.5, 0.5] (expected GRAVY from -3.1 to 3.0), length 5-50

so that the expert sees GRAVY values of every range and residue mixtures unlike the antimicrobial peptides of the
training split. Neither is the held-out generator: no family pattern (transmembrane stretch, heptad, repeat motif),
no Swiss-Prot composition, and every held-out peptide is excluded.
"""

from __future__ import annotations

import random
from typing import Any

from .world import AMINO_ACIDS, MAX_LENGTH, MIN_LENGTH, World, compare_pair, fmt, verdict

__all__ = ["FreshPeptides", "TiltedPeptides", "VariedPeptides", "forward_expert_records", "fresh_mixture"]

KINDS = ("mutated", "recombined", "shuffled", "uniform")


class FreshPeptides:
    """A stream of new peptides from the training split (see the module docstring); `exclude`: peptides never to
    give (by default the world's validation and test splits and the held-out set's peptides)."""

    def __init__(self, world: World, rng: random.Random, exclude: set[str] | None = None) -> None:
        from .peptide_families import HELDOUT_SIZES, heldout_peptides

        self.train = world.splits["train"]
        self.rng = rng
        if exclude is None:
            exclude = set(world.splits["val"]) | set(world.splits["test"])
            exclude |= {p for p, _ in heldout_peptides(sum(HELDOUT_SIZES.values()))}
        self.exclude = exclude

    def _one(self, kind: str) -> str:
        rng = self.rng
        if kind == "mutated":
            rate = rng.uniform(0.1, 0.5)
            return "".join(rng.choice(AMINO_ACIDS) if rng.random() < rate else c for c in rng.choice(self.train))
        if kind == "recombined":
            a, b = rng.choice(self.train), rng.choice(self.train)
            joined = a[: rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1) :]
            return (joined * 2)[: rng.randint(MIN_LENGTH, MAX_LENGTH)]
        if kind == "shuffled":
            seq = list(rng.choice(self.train))
            rng.shuffle(seq)
            return "".join(seq[: rng.randint(MIN_LENGTH, len(seq))])
        return "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))

    def __call__(self) -> str:
        while True:
            seq = self._one(self.rng.choice(KINDS))
            if MIN_LENGTH <= len(seq) <= MAX_LENGTH and seq not in self.exclude:
                return seq


class VariedPeptides(FreshPeptides):
    """FreshPeptides' kinds, plus random-composition and uniform peptides of 5-50 residues (the module docstring)."""

    KINDS = ("mutated", "recombined", "shuffled", "composition", "uniform")
    MIN, MAX = 5, 50

    def _one(self, kind: str) -> str:
        rng = self.rng
        if kind == "composition":
            weights = [rng.gammavariate(0.5, 1.0) for _ in AMINO_ACIDS]
            return "".join(rng.choices(AMINO_ACIDS, weights=weights, k=rng.randint(self.MIN, self.MAX)))
        if kind == "uniform":
            return "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(self.MIN, self.MAX)))
        return super()._one(kind)

    def __call__(self) -> str:
        while True:
            seq = self._one(self.rng.choice(self.KINDS))
            if self.MIN <= len(seq) <= self.MAX and seq not in self.exclude:
                return seq


class TiltedPeptides(VariedPeptides):
    """VariedPeptides' kinds, and as many again drawn from a hydropathy-tilted composition (the module docstring)."""

    KINDS = VariedPeptides.KINDS + ("tilted",) * len(VariedPeptides.KINDS)

    def _one(self, kind: str) -> str:
        if kind != "tilted":
            return super()._one(kind)
        import math

        from Bio.SeqUtils.ProtParamData import kd

        t = self.rng.uniform(-0.5, 0.5)
        weights = [math.exp(t * kd[a]) for a in AMINO_ACIDS]
        return "".join(self.rng.choices(AMINO_ACIDS, weights=weights, k=self.rng.randint(self.MIN, self.MAX)))


def forward_expert_records(
    world: World, n: int, seed: int = 0, *, split_share: float = 0.5, exclude: set[str] | None = None,
    tilted: bool = False,
) -> list[dict[str, Any]]:
    """n forward records for the GRAVY expert: a share `split_share` from the training split (its peptides, repeated
    as the shipped expert saw them), the rest each on a new peptide from `VariedPeptides` (`TiltedPeptides` when
    `tilted`)."""
    from .world import repeat_records

    rng = random.Random(f"{world.seed}-varied-forward-{seed}")
    n_split = round(n * split_share)
    split = [world.forward(p) for p in world.splits["train"]]
    out = repeat_records(split, n_split, f"{world.seed}-varied-split-{seed}") if n_split else []
    varied = (TiltedPeptides if tilted else VariedPeptides)(world, rng, exclude)
    out += [world.forward(varied()) for _ in range(n - n_split)]
    rng.shuffle(out)
    return out


def _context(rng: random.Random, world: World, peptide: str) -> str:
    """Compare's contexts (docs/demo.md), with a fresh peptide where they hold one."""
    kind = rng.random()
    if kind < 0.5:
        return ""
    if kind < 0.65:
        return peptide + " "
    if kind < 0.8:
        return " ".join(rng.choice(world.facts)["name"] for _ in range(rng.randint(1, 3))) + " "
    return f"<{peptide}>="


def fresh_mixture(
    world: World, n: int, seed: int = 0, *, qa_context: bool = True, exclude: set[str] | None = None
) -> list[dict[str, Any]]:
    """n training records for the gate, the four domains in turn, each forward / design / context peptide new:
    forward and design on fresh peptides, compare with fresh contexts, Q&A the closed table's questions (each after
    a context of the world half of the time when qa_context)."""
    rng = random.Random(f"{world.seed}-fresh-{seed}")
    fresh = FreshPeptides(world, rng, exclude)
    questions = world.qa_records()
    out: list[dict[str, Any]] = []
    for i in range(n):
        domain = ("forward", "inverse", "compare", "qa")[i % 4]
        if domain == "forward":
            out.append(world.forward(fresh()))
        elif domain == "inverse":
            out.append(world.inverse(fresh()))
        elif domain == "compare":
            a, b = compare_pair(rng)
            context = _context(rng, world, fresh())
            out.append({"prompt": f"{context}{fmt(a)}>{fmt(b)}?", "completion": verdict(a, b), "domain": "compare"})
        else:
            q = rng.choice(questions)
            context = _context(rng, world, fresh()) if qa_context else ""
            out.append({**q, "prompt": context + q["prompt"]})
    rng.shuffle(out)
    return out
