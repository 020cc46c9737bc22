"""Fine-tuning: `train(TrainConfig(...))` writes a run folder whose `model/` the engine uses directly."""

from .config import TrainConfig, TrainError
from .loop import train
from .plan import split_cases
from .validation import validate

__all__ = ["TrainConfig", "TrainError", "split_cases", "train", "validate"]
