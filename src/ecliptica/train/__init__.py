"""The training engine shared by every method."""

from .engine import NonFiniteError, Trainer, train
from .summary import TrainSummary, read_train_summary

__all__ = ["NonFiniteError", "Trainer", "TrainSummary", "read_train_summary", "train"]
