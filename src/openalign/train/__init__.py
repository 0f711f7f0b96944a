"""Training: the loop, LAMB and AdamW, schedules, checkpoints and logging."""

from .checkpoint import Checkpointer, load_checkpoint_model, load_weights
from .logger import TrainLogger, read_history
from .loop import TrainResult, evaluate, train, train_step
from .optim import Lamb, build_optimizer, parameter_groups
from .schedule import build_scheduler, lr_factor

__all__ = [
    "Checkpointer", "Lamb", "TrainLogger", "TrainResult", "build_optimizer", "build_scheduler", "evaluate",
    "load_checkpoint_model", "load_weights", "lr_factor", "parameter_groups", "read_history", "train", "train_step",
]
