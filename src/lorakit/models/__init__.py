"""Base models: the embedded SmolLM2 default and MiniLM encoder, local HF dirs, tiny random models for tests."""

from lorakit.models.loading import (
    DEFAULT_MODEL_NAME,
    HEADS,
    MINILM_NAME,
    EmbeddedModel,
    cache_root,
    compare_fingerprints,
    default_model_path,
    embedded_model,
    load_model,
    minilm_path,
    model_fingerprint,
    set_threads,
    tiny_gpt2,
    tiny_llama,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "HEADS",
    "MINILM_NAME",
    "EmbeddedModel",
    "cache_root",
    "compare_fingerprints",
    "default_model_path",
    "embedded_model",
    "load_model",
    "minilm_path",
    "model_fingerprint",
    "set_threads",
    "tiny_gpt2",
    "tiny_llama",
]
