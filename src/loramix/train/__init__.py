"""Training: LoRA experts (PEFT) and the gate, on Accelerate. See docs/training.md."""

from .expert import train_expert
from .gate import GateObjective, train_gate
from .loop import TrainConfig, Trainer

__all__ = ["GateObjective", "TrainConfig", "Trainer", "train_expert", "train_gate"]
