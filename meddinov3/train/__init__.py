"""Fine-tuning: `train(TrainConfig(...))` writes a run folder whose `model/` the engine uses directly."""

from .loop import TrainConfig, TrainError, split_cases, train, validate

__all__ = ["TrainConfig", "TrainError", "split_cases", "train", "validate"]
