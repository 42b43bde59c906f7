"""The held-out set's peptides (`loramix.demo.heldout`, whose docstring describes the five families): a generator of
realistic peptides of other lengths and compositions than the shipped ones. Its own module so that the training-data
generators (`loramix.demo.fresh`) can exclude the held-out peptides without importing the held-out set's writers."""

from __future__ import annotations

import random

from .world import MAX_LENGTH, MIN_LENGTH, load_peptides

__all__ = ["FAMILIES", "HELDOUT_SEED", "HELDOUT_SIZES", "SWISSPROT", "heldout_peptides"]

# UniProtKB/Swiss-Prot amino-acid composition (percent; release statistics, rounded)
SWISSPROT = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07, "H": 2.27, "I": 5.96,
    "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip
FAMILIES = ("background", "transmembrane", "disordered", "amphipathic", "repeat")
# records per domain of the held-out set: hundreds, so that one prompt moves a share by at most 1% (QA: the closed
# table's 360 questions, each asked once)
HELDOUT_SIZES = {"forward": 300, "inverse": 300, "compare": 300, "qa": 360, "composite": 300}
HELDOUT_SEED = 39


def _background(rng: random.Random, n: int) -> list[str]:
    return rng.choices(list(SWISSPROT), weights=list(SWISSPROT.values()), k=n)


def _mixed(rng: random.Random, n: int, pool: str, share: float) -> str:
    return "".join(rng.choice(pool) if rng.random() < share else _background(rng, 1)[0] for _ in range(n))


def _peptide(family: str, rng: random.Random, n: int) -> str:
    if family == "background":
        return "".join(_background(rng, n))
    if family == "transmembrane":
        return _mixed(rng, n, "LLLIIVVFFAAGMW", 0.7)
    if family == "disordered":
        return _mixed(rng, n, "EEKKSSPPQGDRN", 0.8)
    if family == "amphipathic":
        start = rng.randrange(7)
        return "".join(
            rng.choice("LLIFVAW") if (start + i) % 7 in (0, 3) else rng.choice("KKRREQSA") for i in range(n)
        )
    if family == "repeat":
        motif = "".join(rng.choice("GPSAEKQTN") for _ in range(rng.randint(2, 4)))
        seq = (motif * (n // len(motif) + 1))[:n]
        return "".join(_background(rng, 1)[0] if rng.random() < 0.1 else c for c in seq)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def heldout_peptides(n: int, seed: int = HELDOUT_SEED) -> list[tuple[str, str]]:
    """n (peptide, family) pairs, the families in turn, lengths uniform in 8-40; none is a shipped peptide (of any
    split) and none repeats."""
    rng = random.Random(f"heldout-{seed}")
    shipped = set(load_peptides())
    seen: set[str] = set()
    out = []
    while len(out) < n:
        family = FAMILIES[len(out) % len(FAMILIES)]
        seq = _peptide(family, rng, rng.randint(MIN_LENGTH, MAX_LENGTH))
        if seq in shipped or seq in seen:
            continue
        seen.add(seq)
        out.append((seq, family))
    return out
