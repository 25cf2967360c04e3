"""Training: the trainer (on accelerate), checkpoints with exact resume, logs and plots; multi-job training."""

from lorakit.train.context import TrainingContext
from lorakit.train.multijob import Job, MultiJobTrainer, RowObjective
from lorakit.train.trainer import ResumeConfigError, TrainConfig, Trainer, TrainResult

__all__ = ["Job", "MultiJobTrainer", "ResumeConfigError", "RowObjective", "TrainConfig", "TrainResult", "Trainer",
           "TrainingContext"]
