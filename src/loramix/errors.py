"""One exception family. Every message names the file, module or field at fault and what was expected."""

from __future__ import annotations


class LoramixError(Exception):
    """Base class of every error loramix raises on purpose. The CLI prints it as one red line (exit code 1)."""


class ConfigError(LoramixError, ValueError):
    """A configuration field is missing, out of range or inconsistent with the model. `field` names the config
    field at fault when one is (the command line turns it into the option's name, the server into the 400's param)."""

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AdapterError(LoramixError):
    """A LoRA expert (PEFT adapter directory) cannot be read or is of an unsupported kind."""


class ShapeMismatchError(LoramixError):
    """Tensors do not fit the module they are meant for."""


class CheckpointError(LoramixError):
    """A loramix checkpoint cannot be written or read."""


class TrainingError(LoramixError):
    """Training cannot go on (the loss became NaN or Inf); the message says which step and what was kept."""


class BaseModelMismatchError(CheckpointError):
    """A checkpoint is loaded on a base model other than the one it was made for."""
