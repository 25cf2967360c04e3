"""Base models: the embedded SmolLM2 default, local HF dirs, tiny random models for tests."""

from lorakit.models.loading import (
    DEFAULT_MODEL_NAME,
    cache_root,
    compare_fingerprints,
    default_model_path,
    load_model,
    model_fingerprint,
    set_threads,
    tiny_gpt2,
    tiny_llama,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "compare_fingerprints",
    "default_model_path",
    "load_model",
    "model_fingerprint",
    "set_threads",
    "tiny_gpt2",
    "tiny_llama",
]
