"""Tasks with provenance (sentiment, supersense, chatterbot, wordnet_pos, fortunes), user files,
collators and next-token classification metrics."""

from lorakit.data.collate import (
    ClassificationCollator,
    LMCollator,
    classification_accuracy,
    classification_loss,
    classification_predictions,
    gather_last,
    label_token_ids,
    model_inputs,
)
from lorakit.data.tasks import (
    DEFAULT_TASK,
    Example,
    Task,
    TaskUnavailableError,
    UnknownTaskError,
    list_tasks,
    load_file,
    load_task,
    split_examples,
)

__all__ = [
    "DEFAULT_TASK",
    "ClassificationCollator",
    "Example",
    "LMCollator",
    "Task",
    "TaskUnavailableError",
    "UnknownTaskError",
    "classification_accuracy",
    "classification_loss",
    "classification_predictions",
    "gather_last",
    "label_token_ids",
    "list_tasks",
    "load_file",
    "load_task",
    "model_inputs",
    "split_examples",
]
