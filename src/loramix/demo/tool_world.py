"""The protein world as tool calls: prompts whose right answer is a call of one of four tools, or plain text, and
how an answer is scored (benchmarks/tool_calls.py runs it on the SmolLM2 export, tool_choice "auto").

    TOOLS            OpenAI tool specs: gravy(sequence), design_peptide(length, gravy), compare(a, b),
                     amino_acid_code(name)
    prompts()        the records, {"prompt", "tool", "arguments"} (tool None: the answer is plain text), 48 in all,
                     made the same on every machine
    score(rec, calls)  {"right_tool", "valid", "right_arguments"}: one call of the right tool (none for a text
                     record), whose arguments follow the tool's schema, and equal the expected ones

Written for the project; the peptides are the shipped mini-world's (`world.load_peptides`).
"""

from __future__ import annotations

import json
import random
from typing import Any

from .world import fmt, load_peptides

__all__ = ["TOOLS", "prompts", "score", "valid_arguments"]

_NAMES = [
    "alanine",
    "arginine",
    "asparagine",
    "aspartate",
    "cysteine",
    "glutamate",
    "glutamine",
    "glycine",
    "histidine",
    "isoleucine",
    "leucine",
    "lysine",
    "methionine",
    "phenylalanine",
    "proline",
    "serine",
    "threonine",
    "tryptophan",
    "tyrosine",
    "valine",
]

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "gravy",
            "description": "The GRAVY (grand average of hydropathy) of a peptide sequence.",
            "parameters": {
                "type": "object",
                "properties": {"sequence": {"type": "string", "pattern": "^[ACDEFGHIKLMNPQRSTVWY]{1,60}$"}},
                "required": ["sequence"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "design_peptide",
            "description": "Design a peptide with a given number of residues and a target GRAVY.",
            "parameters": {
                "type": "object",
                "properties": {
                    "length": {"type": "integer", "minimum": 5, "maximum": 60},
                    "gravy": {"type": "number", "minimum": -4.5, "maximum": 4.5},
                },
                "required": ["length", "gravy"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "compare",
            "description": "Whether the first number is greater than the second.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "amino_acid_code",
            "description": "The one-letter code of an amino acid.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"enum": _NAMES}},
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    },
]

_ASK = {
    "gravy": ["What is the GRAVY of the peptide {sequence}?", "Compute the GRAVY score of {sequence}."],
    "design_peptide": [
        "Design a peptide of {length} residues with a GRAVY of {gravy}.",
        "I need a {length}-residue peptide whose GRAVY is {gravy}.",
    ],
    "compare": ["Is {a} greater than {b}?", "Which is larger, {a} or {b}? Use the tool."],
    "amino_acid_code": ["What is the one-letter code of {name}?", "Code of {name}?"],
}
_TEXT = [
    "What is the capital of France?",
    "Say hello in Spanish.",
    "Give me a synonym of happy.",
    "What is the opposite of cold?",
    "Tell me a fun fact about octopuses.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
]


def prompts() -> list[dict[str, Any]]:
    """10 records per tool and 8 plain-text ones, shuffled with a fixed seed (module docstring)."""
    rng = random.Random(38)
    peptides = [p for p in load_peptides() if len(p) <= 30]
    records: list[dict[str, Any]] = []
    for i in range(10):
        sequence = peptides[rng.randrange(len(peptides))]
        length, target = rng.randrange(8, 31), float(fmt(rng.uniform(-1.5, 1.5)))
        a, b = float(fmt(rng.uniform(-2, 2))), float(fmt(rng.uniform(-2, 2)))
        name = _NAMES[rng.randrange(len(_NAMES))]
        for tool, arguments in (
            ("gravy", {"sequence": sequence}),
            ("design_peptide", {"length": length, "gravy": target}),
            ("compare", {"a": a, "b": b}),
            ("amino_acid_code", {"name": name}),
        ):
            template = _ASK[tool][i % 2]
            shown = {k: (fmt(v) if isinstance(v, float) else v) for k, v in arguments.items()}
            records.append({"prompt": template.format(**shown), "tool": tool, "arguments": arguments})
    records += [{"prompt": text, "tool": None, "arguments": None} for text in _TEXT]
    rng.shuffle(records)
    return records


def valid_arguments(tool: str, arguments: str) -> bool:
    """Whether a call's arguments (JSON text) follow the tool's schema (checked with jsonschema when installed,
    else the required keys and their JSON types)."""
    spec = next((t["function"] for t in TOOLS if t["function"]["name"] == tool), None)
    if spec is None:
        return False
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return False
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the test extra has it
        return isinstance(value, dict) and set(value) == set(spec["parameters"]["required"])
    return jsonschema.Draft202012Validator(spec["parameters"]).is_valid(value)


def score(record: dict[str, Any], calls: list[tuple[str, str]]) -> dict[str, bool]:
    """One answer's scores (module docstring); `calls` as (name, arguments JSON text)."""
    if record["tool"] is None:
        return {"right_tool": not calls, "valid": True, "right_arguments": not calls}
    right = len(calls) == 1 and calls[0][0] == record["tool"]
    valid = all(valid_arguments(name, arguments) for name, arguments in calls) and bool(calls)
    same = right and valid and _same(json.loads(calls[0][1]), record["arguments"])
    return {"right_tool": right, "valid": valid, "right_arguments": same}


def _same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if set(got) != set(want):
        return False
    for key, value in want.items():
        if isinstance(value, float):
            if not isinstance(got[key], (int, float)) or abs(got[key] - value) > 1e-6:
                return False
        elif got[key] != value:
            return False
    return True
