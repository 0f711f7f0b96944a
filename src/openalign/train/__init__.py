"""Training: the loop, LAMB, big_vision's Adafactor and AdamW, schedules, checkpoints and logging."""

from .checkpoint import Checkpointer, load_checkpoint_model, load_weights
from .logger import TrainLogger, read_history
from .loop import TrainResult, evaluate, train, train_step
from .optim import BigVisionAdafactor, Lamb, build_optimizer, parameter_groups
from .schedule import build_scheduler, lr_factor

__all__ = [
    "BigVisionAdafactor", "Checkpointer", "Lamb", "TrainLogger", "TrainResult", "build_optimizer", "build_scheduler",
    "evaluate", "load_checkpoint_model", "load_weights", "lr_factor", "parameter_groups", "read_history", "train",
    "train_step",
]
