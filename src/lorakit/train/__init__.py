"""Training: the trainer (on accelerate), checkpoints with exact resume, logs and plots."""

from lorakit.train.context import TrainingContext
from lorakit.train.trainer import ResumeConfigError, TrainConfig, Trainer, TrainResult

__all__ = ["ResumeConfigError", "TrainConfig", "TrainResult", "Trainer", "TrainingContext"]
