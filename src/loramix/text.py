"""Text around the model: chat rendering (the tokenizer's template or a plain fallback), left-padded prompt
batches, and incremental decoding of generated tokens into stable text pieces. Used by generation, the CLI, the
server, the data loader and the analysis; it knows nothing about experts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["PLAIN_CHAT_FORMAT", "IncrementalDecoder", "encode_prompts", "left_pad", "render_chat"]

PLAIN_CHAT_FORMAT = "{role}: {content}\n"
"""Used for chat messages when the tokenizer has no chat template: one line per message, then 'assistant:' (a space
instead of the newline for a tokenizer that cannot write one, as the shipped demo's character-level one)."""


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for chat messages: the tokenizer's chat template (given the `tools`, OpenAI's tool list,
    when there are some), or the documented plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **extra)
    line = PLAIN_CHAT_FORMAT if writes(tokenizer, "\n") else PLAIN_CHAT_FORMAT.replace("\n", " ")
    missing = "".join(c for c in dict.fromkeys(": assistant" + "".join(m["role"] for m in messages))
                      if not writes(tokenizer, c))  # fmt: skip
    if missing:
        raise ConfigError(
            f"the tokenizer has no chat template, and cannot write {missing!r}, which the plain chat format "
            "('role: content' lines, then 'assistant:') needs: use a checkpoint whose tokenizer has a chat "
            "template, or send the prompt as a completion"
        )
    text = "".join(line.format(role=m["role"], content=m["content"]) for m in messages)
    return text + "assistant:"


def writes(tokenizer: Any, text: str) -> bool:
    """Whether `tokenizer` can write `text`: it encodes and decodes back to the same text (a character outside a
    character-level vocabulary becomes the unknown or padding token, and decodes to something else)."""
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return True
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True) == text


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], *, templated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts into a left-padded batch: (input_ids [B, T], attention_mask [B, T]).

    templated: the texts come from a chat template that already holds the special tokens (no BOS added again).
    Padding uses the tokenizer's pad token, else its eos token, else 0 (masked out either way); the tokenizer is
    not changed, and one with neither token works.
    """
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: pass token ids, or a checkpoint saved with its tokenizer")
    rows = tokenizer(list(prompts), add_special_tokens=not templated)["input_ids"]
    if not rows or any(len(row) == 0 for row in rows):
        raise ConfigError("a prompt is empty after tokenization")
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return left_pad(rows, pad)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of any lengths -> (input_ids [B, T], attention_mask [B, T]), padded with `pad` on the left."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad] * (width - len(row)) + list(row) for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


class IncrementalDecoder:
    """Turn a growing list of token ids into text pieces as soon as they are stable (token by token).

    Decodes a small window (from `prefix` to the end) and emits what it adds to the text of the window up to `read`,
    unless it ends in an incomplete UTF-8 sequence. Works for byte-level BPE, SentencePiece and character tokenizers.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete sequence decodes to replacement characters)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
