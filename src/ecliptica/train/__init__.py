"""The training engine shared by every method."""

from .engine import NonFiniteError, Trainer, train

__all__ = ["NonFiniteError", "Trainer", "train"]
