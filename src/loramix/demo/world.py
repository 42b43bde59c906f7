"""The protein mini-world of the demo: real peptides, exact labels, four task domains and composite prompts.

Data: the 5,200 peptides of modlAMP's AMPvsUniProt.csv (shipped in loramix/demo/data with its licence), kept when
they have 8 to 40 residues; split once into train/validation/test by a hash of the sequence (reproducible, and a
sequence is in one split only). Labels are computed exactly with Biopython ProtParam.

Prompt formats (docs/demo.md); numbers are written with two decimals ("-0.21", "1.30"):
    forward     GRAVY<SEQ>=                    -> the GRAVY of SEQ                       e.g. GRAVY<KKLLAW>= -> -0.42
    inverse     DESIGN<GRAVY,LENGTH>=           -> a peptide of that length and GRAVY     e.g. DESIGN<0.30,24>= -> ...
    compare     [context]A>B?                   -> yes if A > B, else no                   e.g. -0.21>0.50? -> no
    qa          a question about an amino acid -> the fact from the table               e.g. Code of lysine? -> K
    composite   GRAVY<SEQ>=  then  >B?          -> the GRAVY, then whether it is above B, in one answer (two segments)
There is no BOS token: the first character already tells the domain, and a BOS token shared by every domain cannot
be routed by any gate (its keys and values, which every later token attends to, would then differ from each expert's).
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ..scoring import parse_number

__all__ = [
    "AMINO_ACIDS",
    "DOMAINS",
    "World",
    "compare_pair",
    "fmt",
    "gravy",
    "is_valid_peptide",
    "load_peptides",
    "parse_number",
    "repeat_records",
    "verdict",
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DOMAINS = ("forward", "inverse", "compare", "qa")
MIN_LENGTH, MAX_LENGTH = 8, 40

# name, three-letter code, one-letter code, side-chain charge at pH 7, Kyte-Doolittle class
_TABLE = [
    ("alanine", "Ala", "A", "neutral"),
    ("arginine", "Arg", "R", "positive"),
    ("asparagine", "Asn", "N", "neutral"),
    ("aspartate", "Asp", "D", "negative"),
    ("cysteine", "Cys", "C", "neutral"),
    ("glutamine", "Gln", "Q", "neutral"),
    ("glutamate", "Glu", "E", "negative"),
    ("glycine", "Gly", "G", "neutral"),
    ("histidine", "His", "H", "neutral"),
    ("isoleucine", "Ile", "I", "neutral"),
    ("leucine", "Leu", "L", "neutral"),
    ("lysine", "Lys", "K", "positive"),
    ("methionine", "Met", "M", "neutral"),
    ("phenylalanine", "Phe", "F", "neutral"),
    ("proline", "Pro", "P", "neutral"),
    ("serine", "Ser", "S", "neutral"),
    ("threonine", "Thr", "T", "neutral"),
    ("tryptophan", "Trp", "W", "neutral"),
    ("tyrosine", "Tyr", "Y", "neutral"),
    ("valine", "Val", "V", "neutral"),
]


@cache
def _facts() -> tuple[dict[str, str], ...]:
    from Bio.SeqUtils import molecular_weight
    from Bio.SeqUtils.ProtParamData import kd

    out = []
    for name, three, one, charge in _TABLE:
        out.append(
            {
                "name": name,
                "three": three,
                "code": one,
                "charge": charge,
                "class": "hydrophobic" if kd[one] > 0 else "hydrophilic",
                "mass": fmt(molecular_weight(one, seq_type="protein") - 18.02),  # residue mass, Da
            }
        )
    return tuple(out)


# question templates per fact: (question, answer key). The last template of each kind is held out for testing.
QA_TEMPLATES = {
    "code": ["Code of {name}?", "One-letter code of {name}?", "What is the code of {name}?"],
    "name": ["Name of {code}?", "Which amino acid is {code}?", "What is {code}?"],
    "three": ["Three-letter code of {name}?", "Short name of {name}?", "What is the short name of {name}?"],
    "charge": ["Charge of {code}?", "Charge of {name}?", "What is the charge of {code}?"],
    "class": ["Class of {code}?", "Hydropathy of {name}?", "Is {code} hydrophobic or hydrophilic?"],
    "mass": ["Mass of {code}?", "Residue mass of {name}?", "What is the mass of {code}?"],
}


def fmt(x: float) -> str:
    """The world's number format: two decimals, no '-0.00'."""
    text = f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def verdict(a: float, b: float) -> str:
    """The answer to "A>B?" on the numbers as written (two decimals)."""
    return "yes" if float(fmt(a)) > float(fmt(b)) else "no"


def compare_pair(rng: random.Random) -> tuple[float, float]:
    """Two numbers to compare: A in [-2.5, 2.5], B in [-1.5, 1.5], never equal as written."""
    a = round(rng.uniform(-2.5, 2.5), 2)
    b = a
    while fmt(b) == fmt(a):
        b = round(rng.uniform(-1.5, 1.5), 2)
    return a, b


def repeat_records(records: list[dict[str, Any]], n: int, seed: str) -> list[dict[str, Any]]:
    """n records: the records, then reshuffled copies of them (small domains are repeated), cut at n."""
    rng = random.Random(seed)
    out = list(records)
    while len(out) < n:
        out.extend(rng.sample(records, len(records)))
    return out[:n]


def is_valid_peptide(seq: str) -> bool:
    return len(seq) > 0 and all(c in AMINO_ACIDS for c in seq)


def gravy(seq: str) -> float:
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    return ProteinAnalysis(seq).gravy()


@cache
def load_peptides() -> tuple[str, ...]:
    """The shipped peptides with 8-40 residues of the 20 standard amino acids, deduplicated, in file order."""
    path = resources.files("loramix.demo").joinpath("data/AMPvsUniProt.csv")
    seen: dict[str, None] = {}
    with path.open() as f:
        rows = csv.reader(f)
        next(rows)  # header "5200,1,UniProt,AMP" (scikit-learn style), not data
        for row in rows:
            seq = row[0].strip()
            if MIN_LENGTH <= len(seq) <= MAX_LENGTH and is_valid_peptide(seq):
                seen[seq] = None
    return tuple(seen)


def _split_of(seq: str) -> str:
    bucket = int(hashlib.sha1(seq.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


@dataclass
class World:
    """Task generators over the peptide splits; every record carries its domain and what is needed to score it."""

    seed: int = 0

    def __post_init__(self) -> None:
        self.facts = _facts()
        self.splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for seq in load_peptides():
            self.splits[_split_of(seq)].append(seq)
        self.train_set = set(self.splits["train"])

    # ------------------------------------------------------------------ records

    def forward(self, seq: str) -> dict[str, Any]:
        g = gravy(seq)
        return {"prompt": f"GRAVY<{seq}>=", "completion": fmt(g), "domain": "forward", "answer": round(g, 2)}

    def inverse(self, seq: str) -> dict[str, Any]:
        g = round(gravy(seq), 2)
        return {
            "prompt": f"DESIGN<{fmt(g)},{len(seq)}>=",
            "completion": seq,
            "domain": "inverse",
            "target": g,
            "length": len(seq),
        }

    def compare(self, rng: random.Random) -> dict[str, Any]:
        """A>B? -> yes/no, with A in [-2.5, 2.5] and B in [-1.5, 1.5] (never equal), after a context of the world half
        of the time (nothing, a peptide, a few words, or a bracketed peptide and '='), so that the skill does not
        depend on starting the text."""
        a, b = compare_pair(rng)
        kind = rng.random()
        if kind < 0.5:
            context = ""
        elif kind < 0.65:
            context = rng.choice(self.splits["train"]) + " "
        elif kind < 0.8:
            context = " ".join(rng.choice(self.facts)["name"] for _ in range(rng.randint(1, 3))) + " "
        else:
            context = f"<{rng.choice(self.splits['train'])}>="
        return {"prompt": f"{context}{fmt(a)}>{fmt(b)}?", "completion": verdict(a, b), "domain": "compare"}

    def qa(self, fact: dict[str, str], kind: str, template: str) -> dict[str, Any]:
        return {"prompt": template.format(**fact), "completion": fact[kind], "domain": "qa"}

    def composite(self, seq: str, rng: random.Random) -> dict[str, Any]:
        """A property, then reasoning on it, in one answer: the model writes the GRAVY (segment 1); the harness then
        appends ">B?" and the model says whether its GRAVY is above B (segment 2)."""
        g = round(gravy(seq), 2)
        b = g
        while fmt(b) == fmt(g):
            b = round(rng.uniform(-1.5, 1.5), 2)
        return {
            "prompt": f"GRAVY<{seq}>=",
            "completion": f"{fmt(g)}>{fmt(b)}?{verdict(g, b)}",
            "domain": "composite",
            "then": f">{fmt(b)}?",
            "first": g,
            "experts": ["forward", "compare"],
        }

    # ------------------------------------------------------------------ datasets

    def qa_records(self) -> list[dict[str, Any]]:
        """Every question of the closed table: 20 amino acids x 6 facts x 3 phrasings (the same in every split: the
        skill is recalling the table, not generalising beyond it)."""
        kinds = QA_TEMPLATES.items()
        return [self.qa(fact, kind, t) for fact in self.facts for kind, templates in kinds for t in templates]

    def domain_records(self, domain: str, split: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Records of one domain: train uses the train peptides (and QA's training phrasings); val/test the others."""
        rng = random.Random(f"{self.seed}-{domain}-{split}-{seed}")
        seqs = list(self.splits[split])
        rng.shuffle(seqs)
        if domain == "forward":
            out = [self.forward(s) for s in seqs]
        elif domain == "inverse":
            out = [self.inverse(s) for s in seqs]
        elif domain == "compare":
            out = [self.compare(rng) for _ in range(n or len(seqs))]
        elif domain == "qa":
            out = self.qa_records()
            rng.shuffle(out)
        elif domain == "composite":
            out = [self.composite(s, rng) for s in seqs]
        else:
            raise ValueError(f"unknown domain {domain!r}")
        return out[:n] if n is not None else out

    def generic_corpus(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        """Text of the world for pretraining the base, with none of the tasks: raw training peptides, lists of
        numbers in the world's format, and lists of words (amino-acid names, codes and property words, unpaired)."""
        rng = random.Random(f"{self.seed}-generic-{seed}")
        words = [f[k] for f in self.facts for k in ("name", "three", "code")]
        words += [
            "positive",
            "negative",
            "neutral",
            "hydrophobic",
            "hydrophilic",
            "peptide",
            "sequence",
            "mass",
            "charge",
            "class",
            "code",
            "name",
            "what",
            "is",
            "of",
            "the",
            "which",
            "amino",
            "acid",
            "short",
        ]
        out = []
        train = self.splits["train"]
        for i in range(n):
            kind = i % 4
            if kind in (0, 1):
                out.append({"text": rng.choice(train)})
            elif kind == 2:
                out.append({"text": " ".join(fmt(rng.uniform(-4.5, 4.5)) for _ in range(rng.randint(3, 8)))})
            else:
                out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))})
        return out
