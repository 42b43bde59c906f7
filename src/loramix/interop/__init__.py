"""Interop with other X-LoRA implementations and formats."""

from .peft import from_peft

__all__ = ["from_peft"]
