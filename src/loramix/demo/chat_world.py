"""The protein world phrased for a chat model (the SmolLM2 demo), plus a general-chat domain that the mixture must
leave to the base model.

Every prompt is the tokenizer's chat template around one user message (`loramix.text.render_chat`, SmolLM2's default
system line included), so records are plain {"prompt", "completion"} pairs that `loramix train-expert`,
`loramix train-gate` and `loramix eval` read. The answers are as short as in the mini-world:

    forward     "What is the GRAVY of the peptide SEQ?"                      -> "-0.42"
    inverse     "Design a peptide of 24 residues with a GRAVY of 0.30."      -> a peptide
    compare     a user turn, then the assistant's own "A>B?"                 -> "yes" / "no"
    qa          "Code of lysine?" (the mini-world's questions)                -> "K"
    composite   the forward question; the model writes the GRAVY, the harness appends ">B?", the model says yes/no
    chat        a general instruction (`instructions`)                        -> the base model's own greedy answer

The compare domain's user turn is a comparison question half of the time and otherwise another of the world's
questions (a GRAVY question, an amino-acid question), so that the verdict does not depend on how the turn began: the
same trick as the mini-world's compare contexts (docs/demo-smollm2.md).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..scoring import Records, Scorer, register_scorer
from .world import World, compare_pair, fmt, gravy, verdict

__all__ = ["CHAT_DOMAINS", "FIRST_SENTENCE", "ChatWorld", "first_sentence", "instructions"]

CHAT_DOMAINS = ("forward", "inverse", "compare", "qa", "chat")

FORWARD = ["What is the GRAVY of the peptide {seq}?", "Compute the GRAVY score of {seq}.", "GRAVY of {seq}?"]
INVERSE = ["Design a peptide of {n} residues with a GRAVY of {g}.", "Write a {n}-residue peptide whose GRAVY is {g}."]
COMPARE = ["Is {a} greater than {b}?", "Compare {a} and {b}.", "Which is larger, {a} or {b}?"]

# general instructions written for the project: template x fillers, a few hundred in all
_CHAT_TEMPLATES: dict[str, list[str]] = {
    "What is the capital of {}?": [
        "France",
        "Germany",
        "Italy",
        "Spain",
        "Japan",
        "Canada",
        "Brazil",
        "Egypt",
        "Kenya",
        "India",
        "China",
        "Mexico",
        "Peru",
        "Norway",
        "Sweden",
        "Poland",
        "Greece",
        "Turkey",
        "Australia",
        "Argentina",
        "Chile",
        "Portugal",
        "Ireland",
        "Austria",
        "Vietnam",
        "Thailand",
        "Morocco",
        "Nigeria",
        "Cuba",
        "Finland",
    ],
    "Give me a synonym for the word '{}'.": [
        "happy",
        "fast",
        "big",
        "small",
        "smart",
        "angry",
        "tired",
        "quiet",
        "brave",
        "rich",
        "cold",
        "funny",
        "strong",
        "easy",
        "beautiful",
        "old",
        "begin",
        "help",
        "answer",
        "buy",
        "shout",
        "house",
        "car",
        "friend",
    ],
    "What is the opposite of '{}'?": [
        "hot",
        "up",
        "light",
        "early",
        "open",
        "full",
        "hard",
        "love",
        "win",
        "push",
        "inside",
        "young",
        "clean",
        "happy",
        "true",
        "high",
        "before",
        "first",
        "remember",
        "accept",
        "north",
        "day",
        "wet",
        "loud",
    ],
    "Write one sentence about {}.": [
        "the ocean",
        "autumn",
        "a busy city",
        "coffee",
        "your favourite book",
        "mountains",
        "the moon",
        "rain",
        "a dog",
        "music",
        "friendship",
        "the history of bread",
        "space travel",
        "a garden",
        "winter mornings",
        "trains",
        "the internet",
        "a library",
        "birds",
        "chess",
    ],
    "Explain what {} is in one sentence.": [
        "photosynthesis",
        "gravity",
        "a computer",
        "democracy",
        "a volcano",
        "electricity",
        "an atom",
        "a rainbow",
        "the internet",
        "inflation",
        "a vaccine",
        "a galaxy",
        "evolution",
        "a language",
        "a recipe",
        "an ecosystem",
        "a battery",
        "the weather",
        "a map",
        "a museum",
    ],
    "Translate '{}' into French.": [
        "good morning",
        "thank you",
        "the cat",
        "I am hungry",
        "see you tomorrow",
        "the red house",
        "water",
        "my friend",
        "good night",
        "where is the station",
        "I love music",
        "the book",
        "how are you",
        "yes",
        "the sun",
        "a cup of tea",
    ],
    "Name a {}.": [
        "fruit",
        "colour",
        "planet",
        "musical instrument",
        "country in Africa",
        "sport",
        "vegetable",
        "mammal",
        "bird",
        "famous painter",
        "programming language",
        "flower",
        "tree",
        "river",
        "metal",
        "gemstone",
    ],
    "Give one tip for {}.": [
        "sleeping better",
        "learning a language",
        "saving money",
        "staying healthy",
        "studying for an exam",
        "writing an email",
        "cooking pasta",
        "running a marathon",
        "keeping plants alive",
        "public speaking",
        "staying focused",
        "travelling light",
        "making friends",
        "reducing stress",
        "drinking more water",
    ],
    "What do {} eat?": [
        "cats",
        "rabbits",
        "pandas",
        "lions",
        "cows",
        "bees",
        "whales",
        "owls",
        "horses",
        "sharks",
        "koalas",
        "penguins",
        "frogs",
        "elephants",
        "squirrels",
        "spiders",
    ],
    "How many {}?": [
        "days are in a week",
        "legs does a spider have",
        "minutes are in an hour",
        "continents are there",
        "sides does a triangle have",
        "months are in a year",
        "planets are in the solar system",
        "hours are in a day",
        "players are in a football team",
        "strings does a guitar have",
    ],
    "Why is {}?": [
        "the sky blue",
        "sleep important",
        "exercise good for you",
        "the sea salty",
        "recycling useful",
        "reading important",
        "water important for life",
        "the sun hot",
        "ice slippery",
        "grass green",
    ],
    "Tell me a fun fact about {}.": [
        "octopuses",
        "the sun",
        "honey",
        "bananas",
        "the human brain",
        "penguins",
        "the Eiffel Tower",
        "dolphins",
        "Mars",
        "snow",
        "ants",
        "the ocean",
        "chocolate",
        "giraffes",
        "lightning",
    ],
}


def instructions() -> list[str]:
    """The general-chat instructions, in a fixed order (a few hundred)."""
    return [template.format(filler) for template, fillers in _CHAT_TEMPLATES.items() for filler in fillers]


def _split_of(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def first_sentence(text: str) -> str:
    """The first sentence of an answer: up to the first '.', '!' or '?' followed by a space or the end, or the first
    line; whitespace-normalised."""
    text = " ".join(text.strip().split("\n", 1)[0].split())
    for i, c in enumerate(text):
        if c in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def _first_sentence(records: Records, answers: list[str], context: dict[str, Any]) -> dict[str, float]:
    n = len(records)
    agree = sum(first_sentence(a) == first_sentence(r["completion"]) for a, r in zip(answers, records))
    return {
        "agreement": agree / n,
        "exact_match": sum(a.strip() == r["completion"].strip() for a, r in zip(answers, records)) / n,
    }


FIRST_SENTENCE = register_scorer(Scorer("first_sentence", "agreement", _first_sentence, max_new_tokens=32))
"""General chat: agreement of the answer's first sentence with the reference's (the base model's own answer)."""


@dataclass
class ChatWorld:
    """The protein world's domains as chat prompts for `tokenizer`; `references` maps each general instruction to
    the base model's answer (needed by the "chat" domain only)."""

    tokenizer: Any
    references: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.world = World(seed=self.seed)

    def chat_prompt(self, user: str) -> str:
        from ..text import render_chat

        return render_chat(self.tokenizer, [{"role": "user", "content": user}])

    # ------------------------------------------------------------------ records

    def forward(self, seq: str, rng: random.Random) -> dict[str, Any]:
        g = gravy(seq)
        prompt = self.chat_prompt(rng.choice(FORWARD).format(seq=seq))
        return {"prompt": prompt, "completion": fmt(g), "domain": "forward", "answer": round(g, 2)}

    def inverse(self, seq: str, rng: random.Random) -> dict[str, Any]:
        g = round(gravy(seq), 2)
        prompt = self.chat_prompt(rng.choice(INVERSE).format(n=len(seq), g=fmt(g)))
        return {"prompt": prompt, "completion": seq, "domain": "inverse", "target": g, "length": len(seq)}

    def compare(self, rng: random.Random) -> dict[str, Any]:
        a, b = compare_pair(rng)
        kind = rng.random()
        if kind < 0.5:
            user = rng.choice(COMPARE).format(a=fmt(a), b=fmt(b))
        elif kind < 0.8:
            user = rng.choice(FORWARD).format(seq=rng.choice(self.world.splits["train"]))
        else:
            user = rng.choice(self.world.qa_records())["prompt"]
        return {
            "prompt": self.chat_prompt(user) + f"{fmt(a)}>{fmt(b)}?",
            "completion": verdict(a, b),
            "domain": "compare",
        }

    def composite(self, seq: str, rng: random.Random) -> dict[str, Any]:
        record = self.world.composite(seq, rng)
        return {**record, "prompt": self.chat_prompt(rng.choice(FORWARD).format(seq=seq))}

    def chat(self, instruction: str) -> dict[str, Any]:
        if instruction not in self.references:
            raise KeyError(f"no reference answer for the instruction {instruction!r}")
        return {
            "prompt": self.chat_prompt(instruction),
            "completion": self.references[instruction],
            "domain": "chat",
            "scoring": "first_sentence",
        }

    def domain_records(self, domain: str, split: str, n: int | None = None) -> list[dict[str, Any]]:
        """Records of one domain and split (train / val / test), shuffled with a fixed seed."""
        rng = random.Random(f"{self.seed}-chat-{domain}-{split}")
        seqs = list(self.world.splits[split])
        rng.shuffle(seqs)
        make: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "forward": lambda: [self.forward(s, rng) for s in seqs],
            "inverse": lambda: [self.inverse(s, rng) for s in seqs],
            "compare": lambda: [self.compare(rng) for _ in range(n or len(seqs))],
            "composite": lambda: [self.composite(s, rng) for s in seqs],
            "qa": lambda: [
                {**r, "prompt": self.chat_prompt(r["prompt"])} for r in self.world.domain_records("qa", split)
            ],
            "chat": lambda: [self.chat(i) for i in self._instructions(split, rng)],
        }
        if domain not in make:
            raise ValueError(f"unknown domain {domain!r}")
        out = make[domain]()
        return out[:n] if n is not None else out

    def _instructions(self, split: str, rng: random.Random) -> list[str]:
        out = [i for i in instructions() if _split_of(i) == split]
        rng.shuffle(out)
        return out


def read_references(path: Any) -> dict[str, str]:
    """{instruction: answer} from a JSONL file of {"instruction", "answer"} lines."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["instruction"]] = row["answer"]
    return out
