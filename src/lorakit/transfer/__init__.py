"""Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258): transfer a LoRA to another base model (another
family and tokenizer) through filtered synthetic inputs labelled by the source model + adapter."""

from lorakit.transfer.discriminator import (
    DISCRIMINATOR_DIR,
    DiscriminatorFileError,
    EmbeddingDiscriminator,
    LoraDiscriminator,
    MiniLMEncoder,
    load_discriminator,
    prepare_source,
    save_discriminator,
    train_discriminator,
)
from lorakit.transfer.filters import FILTERS, contrastive_excess_scores, contrastive_excess_tokens, select
from lorakit.transfer.generate import few_shot_prompt, generate_candidates
from lorakit.transfer.labels import (
    LabelStringCollator,
    SoftExample,
    distill_loss,
    hard_label_loss,
    label_accuracy,
    label_distribution,
    label_log_scores,
)
from lorakit.transfer.pipeline import Transfer, TransferArgs, TransferResult, train_student

__all__ = [
    "DISCRIMINATOR_DIR",
    "FILTERS",
    "DiscriminatorFileError",
    "EmbeddingDiscriminator",
    "LabelStringCollator",
    "LoraDiscriminator",
    "MiniLMEncoder",
    "SoftExample",
    "Transfer",
    "TransferArgs",
    "TransferResult",
    "contrastive_excess_scores",
    "contrastive_excess_tokens",
    "distill_loss",
    "few_shot_prompt",
    "generate_candidates",
    "hard_label_loss",
    "label_accuracy",
    "label_distribution",
    "label_log_scores",
    "load_discriminator",
    "prepare_source",
    "save_discriminator",
    "select",
    "train_discriminator",
    "train_student",
]
