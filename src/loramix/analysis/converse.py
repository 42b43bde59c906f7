"""Two agents in a conversation, with the expert trajectory of each (`loramix converse`).

Agent A and agent B are two personas (system prompts) over the same model, or two models. Each agent sees the
conversation from its side: its own turns as "assistant", the other's as "user", after its system prompt; the
opening message starts agent A. Each turn is generated with the agent's chat template (or the plain fallback), and
its scalings are recorded; the trajectory is the mean scaling of each expert per turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..base import resolve_defaults
from ..errors import ConfigError, LoramixError
from ..grammar import Grammar
from ..io import atomic_directory, write_json
from ..text import encode_prompts, render_chat
from .collect import ScalingsRecorder
from .plots import plot_trajectory
from .report import sequence_scalings

__all__ = ["CONVERSE_FILES", "converse"]

CONVERSE_FILES = ("transcript.json", "transcript.md", "agent-*", "figures")  # what converse writes


def _fit(tokenizer: Any, messages: list[dict[str, str]], budget: int | None) -> str:
    """Render the chat, dropping the oldest non-system turns while it is longer than `budget` tokens (None: the
    model's context is unknown, nothing is dropped)."""
    messages = list(messages)
    while True:
        text = render_chat(tokenizer, messages)
        if budget is None:
            return text
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        droppable = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if n <= budget or len(droppable) <= 1:
            return text
        del messages[droppable[0]]


def converse(
    model_a: Any,
    out_dir: str | Path,
    *,
    model_b: Any = None,
    persona_a: str = "You are agent A.",
    persona_b: str = "You are agent B.",
    opening: str = "Hello.",
    turns: int = 6,
    max_new_tokens: int = 64,
    summary_prompt: str | None = None,
    fmt: str = "parquet",
    relay_a: str | None = None,
    relay_b: str | None = None,
    json_schema_a: Any = None,
    json_schema_b: Any = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run `turns` turns (A, B, A, ...), then optionally a summary by agent A. Writes transcript.json and
    transcript.md, scalings table and summary per agent, and figures/trajectory.{png,svg}. Returns the transcript.

    relay_a / relay_b: how A's (B's) turns reach the other agent, a template with "{text}" (e.g. "What is the GRAVY
    of the peptide {text}?"); None: verbatim. With relay_a, B hears only the relayed turns, not the opening.

    json_schema_a / json_schema_b: the agent answers in JSON valid against this schema (structured output,
    `generate(json_schema=...)`); its turns in the transcript then carry the parsed value as "json" (None when a turn
    ran out of tokens before the JSON closed)."""
    if turns < 1:
        raise ConfigError(f"turns={turns} must be >= 1")
    for name, relay in (("relay_a", relay_a), ("relay_b", relay_b)):
        if relay is not None and "{text}" not in relay:
            raise ConfigError(f'{name}={relay!r} must contain "{{text}}", where the other agent\'s turn goes')
    model_b = model_b if model_b is not None else model_a
    agents = {"A": (model_a, persona_a), "B": (model_b, persona_b)}
    for name, (model, _) in agents.items():
        if model.tokenizer is None:
            raise ConfigError(f"agent {name}'s model has no tokenizer")
    schemas = {"A": json_schema_a, "B": json_schema_b}
    grammars = {
        name: Grammar.for_model(model, schemas[name]) if schemas[name] is not None else None
        for name, (model, _) in agents.items()
    }
    with atomic_directory(out_dir, marker="transcript.json", owned=CONVERSE_FILES, what="--out") as out:
        recorders = {
            name: ScalingsRecorder(out / f"agent-{name}", m.expert_names, m.layer_names, tokenizer=m.tokenizer, fmt=fmt)
            for name, (m, _) in agents.items()
        }
        history: list[tuple[str, str]] = []  # (agent, text)
        relay = {"A": relay_a, "B": relay_b}  # how each agent's turns reach the other
        transcript: list[dict[str, Any]] = []
        trajectory: dict[str, list[tuple[int, torch.Tensor]]] = {"A": [], "B": []}

        def speak(agent: str, turn: int, extra_user: str | None = None) -> str:
            model, persona = agents[agent]
            messages = [{"role": "system", "content": persona}]
            if agent == "A":
                messages.append({"role": "user", "content": opening})
            for speaker, text in history:
                role = "assistant" if speaker == agent else "user"
                if role == "user" and relay[speaker] is not None:
                    text = relay[speaker].replace("{text}", text)
                elif agent == "B" and not any(m["role"] == "user" for m in messages[1:]) and role == "user":
                    text = f"{opening}\n\n{text}"  # B hears the opening together with A's first turn
                messages.append({"role": role, "content": text})
            if extra_user is not None:
                messages.append({"role": "user", "content": extra_user})
            context = resolve_defaults(model).context
            budget = max(16, context - max_new_tokens) if context is not None else None
            prompt = _fit(model.tokenizer, messages, budget)
            templated = bool(getattr(model.tokenizer, "chat_template", None))
            ids, mask = encode_prompts(model.tokenizer, [prompt], templated=templated)
            gen = model.generate(ids, mask, max_new_tokens=max_new_tokens, grammar=grammars[agent], **generate_kwargs)
            new = gen.new_tokens[0, : gen.lengths[0]].cpu()
            if gen.errors[0]:  # a turn is one request: its failure ends the conversation
                raise LoramixError(f"turn {turn} (agent {agent}): {gen.errors[0]}")
            text = gen.texts[0].strip()  # request.py: stop strings cut, the end token not text
            full = torch.cat([ids[0], new])
            s = sequence_scalings(model, full)[ids.shape[1] :]  # the turn's own tokens
            if len(new):
                recorders[agent].add(
                    s, new.tolist(), sequence=f"turn-{turn}", domain=f"agent-{agent}", sources="generated", turn=turn
                )
                trajectory[agent].append((turn, s.mean((0, 1))))
            mean = dict(zip(model.expert_names, s.mean((0, 1)).tolist())) if len(new) else {}
            transcript.append(
                {
                    "turn": turn,
                    "agent": agent,
                    "text": text,
                    "tokens": len(new),
                    "finish_reason": gen.finish_reasons[0],
                    "mean_scalings": mean,
                    "dominant": max(mean, key=mean.get) if mean else None,
                }
            )
            if grammars[agent] is not None:
                transcript[-1]["json"] = json.loads(text) if gen.finish_reasons[0] == "stop" else None
            return text

        for turn in range(1, turns + 1):
            agent = "A" if turn % 2 == 1 else "B"
            history.append((agent, speak(agent, turn)))
        if summary_prompt:
            speak("A", turns + 1, extra_user=summary_prompt)
            transcript[-1]["summary"] = True

        summaries = {name: r.close() for name, r in recorders.items()}
        per_agent = {
            name: ([t for t, _ in points], torch.stack([v for _, v in points]), agents[name][0].expert_names)
            for name, points in trajectory.items()
            if points
        }
        figures = (
            plot_trajectory(
                per_agent, out / "figures" / "trajectory", title="Expert trajectories over the conversation"
            )
            if per_agent
            else []
        )
        record = {
            "personas": {"A": persona_a, "B": persona_b},
            "relays": {"A": relay_a, "B": relay_b},
            "opening": opening,
            "turns": transcript,
            "figures": [str(p.relative_to(out)) for p in figures],
            "usage": {name: s["groups"]["all"]["usage"] for name, s in summaries.items() if "all" in s["groups"]},
        }
        write_json(out / "transcript.json", record)
        lines = [
            "# Conversation",
            "",
            f"**Opening:** {opening}",
            "",
            f"**Agent A:** {persona_a}",
            f"**Agent B:** {persona_b}",
            "",
        ]
        for t in transcript:
            dominant = t["dominant"] or "-"
            tag = " (summary)" if t.get("summary") else ""
            lines += [
                f"### Turn {t['turn']}: agent {t['agent']}{tag} (dominant expert: {dominant})",
                "",
                t["text"] or "∅",
                "",
            ]
        (out / "transcript.md").write_text("\n".join(lines))
        return record
