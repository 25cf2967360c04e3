"""Condition providers of the ``generate/`` axis: what a parameter generator is conditioned on.

Three kinds (notes LATER-ROWS §3.5):

- :func:`text_encoder`: a sentence embedding of a task description. ``"minilm"`` is all-MiniLM-L6-v2
  (in place of SG-LoRA's CLIP text encoder and Text-to-LoRA's gte-large), pooled as sentence-transformers
  does: mean over the attention mask, then L2 normalisation, at most 256 tokens (the model's
  ``sentence_bert_config.json``). Other encoders register under a name (:func:`register_text_encoder`).
- :func:`hidden_state_condition`: ICM-LoRA's "task vector" (Shao et al., IJCAI 2025, arXiv 2501.17635):
  a decoder layer's hidden state on task samples, averaged.
- :func:`semantic_prior`: SG-LoRA's parameter-space prior (Li et al., CVPR 2026, arXiv 2509.10535, the
  sparse aggregator and App. B): a softmax-weighted mixture of the top-K experts by description
  similarity, summarised by its mean and variance.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

MINILM_MAX_TOKENS = 256  # all-MiniLM-L6-v2's sentence_bert_config.json max_seq_length
DEFAULT_TAU = 0.1  # SG-LoRA does not state τ; lorakit's choice (the notes sweep {0.05, 0.1, 0.5})


class ConditionError(ValueError):
    """Bad input to a condition provider: unknown encoder, wrong shapes, empty texts."""


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> torch.Tensor: ...


# -- text ---------------------------------------------------------------------------------------------

class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 from :func:`lorakit.models.loading.minilm_path` with sentence-transformers pooling:

        e = normalize( Σ_t m_t h_t / max(Σ_t m_t, 1e-9) ),   h = last hidden states, m = attention mask.
    """

    dim = 384

    def __init__(self, path: str | None = None, batch_size: int = 32, max_length: int = MINILM_MAX_TOKENS) -> None:
        from transformers import AutoModel, AutoTokenizer

        from lorakit.models.loading import minilm_path

        folder = str(path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(out).float()


class _FunctionEncoder:
    def __init__(self, fn: Callable[[list[str]], Any]) -> None:
        self.fn = fn

    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        out = torch.as_tensor(self.fn(texts)).float()
        if out.dim() != 2 or out.shape[0] != len(texts):
            raise ConditionError(f"the registered encoder returned shape {tuple(out.shape)} for {len(texts)} "
                                 "text(s); it must return [N, E]")
        return out


def _hash_encoder() -> Any:
    """``hash``: the dependency-free bag-of-words encoder of :mod:`lorakit.compose.retrieve` (64-d, no
    semantics, deterministic): for tests and offline smoke runs."""
    from lorakit.compose.retrieve.autolora import HashTextEncoder

    return HashTextEncoder()


_FACTORIES: dict[str, Callable[[], Any]] = {"minilm": MiniLMTextEncoder, "hash": _hash_encoder}
_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()


def register_text_encoder(name: str, encoder: Any) -> None:
    """Make ``text_encoder(name)`` return ``encoder``: an object with ``encode(list[str]) -> [N, E]``, a
    zero-argument factory of one (called once, on first use), or a plain function ``list[str] -> [N, E]``.
    Re-registering a name replaces it (and drops the cached instance)."""
    if not isinstance(name, str) or not name.strip():
        raise ConditionError("an encoder name must be a non-empty string")
    if isinstance(encoder, type):
        factory: Callable[[], Any] = encoder
    elif hasattr(encoder, "encode"):
        factory = lambda: encoder  # noqa: E731
    elif callable(encoder):
        factory = lambda: _FunctionEncoder(encoder)  # noqa: E731
    else:
        raise ConditionError(f"register_text_encoder({name!r}): give an object with .encode, a factory or a function")
    with _LOCK:
        _FACTORIES[name] = factory
        _CACHE.pop(name, None)


def unregister_text_encoder(name: str) -> None:
    with _LOCK:
        _FACTORIES.pop(name, None)
        _CACHE.pop(name, None)


def text_encoder(name: str = "minilm") -> TextEncoder:
    """The text encoder registered as ``name`` (built once per process): ``minilm`` (384-d, L2-normalised),
    ``hash`` (64-d bag of words, no model, not normalised) or one added with :func:`register_text_encoder`."""
    with _LOCK:
        if name not in _CACHE:
            if name not in _FACTORIES:
                raise ConditionError(f"unknown text encoder {name!r}; known: {sorted(_FACTORIES)} "
                                     "(add one with register_text_encoder)")
            _CACHE[name] = _FACTORIES[name]()
        return _CACHE[name]


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ConditionError("give a non-empty list of strings")
    if not all(isinstance(t, str) for t in texts):
        raise ConditionError("every text must be a string")
    return list(texts)


# -- hidden state (ICM-LoRA) ---------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (ICM-LoRA hooks ``language_model.get_decoder().layers``)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (dec, getattr(model, "model", None), getattr(model, "transformer", None), model):
        for attr in ("layers", "h", "blocks"):
            layers = getattr(owner, attr, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers):
                return layers
    raise ConditionError(f"cannot find the decoder layers of {type(model).__name__} (no .layers / .h / .blocks)")


@contextlib.contextmanager
def _adapter_mode(model: nn.Module, adapter: str | None) -> Iterator[None]:
    from lorakit.core.inject import active_adapters, disabled, set_active, specs

    if adapter is None:
        with disabled(model) if specs(model) else contextlib.nullcontext():
            yield
        return
    if adapter not in specs(model):
        raise ConditionError(f"the model has no adapter {adapter!r}; attached: {sorted(specs(model))}")
    before = active_adapters(model)
    set_active(model, adapter)
    try:
        yield
    finally:
        set_active(model, before)


@torch.no_grad()
def hidden_state_condition(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, adapter: str | None = None,
                           layer: int = -1, reduce: str = "last_token", generate_steps: int = 0, num_beams: int = 1,
                           in_context: int = 1, batch_size: int = 8, max_length: int = 512) -> torch.Tensor:
    """ICM-LoRA's task vector: the mean output hidden state of decoder layer ``layer`` over task samples ([H]).

    [CODE ``ICL/last_time_step_icl.py``] loads the LoRA-tuned model, hooks
    ``get_decoder().layers[-1]``, runs ``generate`` (3 beams, up to 1024 new tokens) on 30 training samples
    and averages the last-position hidden state recorded at every decoding step (all beams). The paper
    [ABS] calls this "in-context meta-learning" on task descriptions.

    - ``adapter="name"``: run with that attached adapter active (the code's ``hidden_state``; it needs the
      tuned adapter, so it is circular for unseen tasks). ``adapter=None``: the base model with adapters
      disabled (``base_hidden_state``), with ``in_context=k`` samples joined by newlines per prompt
      (lorakit's reading of "in-context": consecutive chunks of k texts).
    - ``generate_steps=0``: one forward per prompt; ``reduce="last_token"`` takes the last non-pad
      position, ``"mean"`` the mean over non-pad positions (lorakit's options). ``generate_steps=N > 0``:
      the code's recipe, the last-position state at the prompt and at each of N greedy (or ``num_beams``)
      decoding steps, every beam, all averaged (lorakit defaults to 1 beam and short N for cost; the
      code uses 3 beams and 1024 steps); ``reduce`` is then ignored.
    """
    texts = _check_texts(texts)
    if reduce not in ("last_token", "mean"):
        raise ConditionError(f"reduce must be 'last_token' or 'mean', got {reduce!r}")
    for nm, v, lo in (("generate_steps", generate_steps, 0), ("num_beams", num_beams, 1),
                      ("in_context", in_context, 1), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConditionError(f"{nm} must be an integer >= {lo}, got {v!r}")
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ConditionError(f"layer {layer} is out of range for {len(layers)} decoder layers")
    prompts = ["\n".join(texts[i:i + in_context]) for i in range(0, len(texts), in_context)]
    records: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        records.append((output[0] if isinstance(output, tuple) else output).detach().float())

    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    total, count = None, 0
    handle = layers[layer].register_forward_hook(hook)
    try:
        with _adapter_mode(model, adapter):
            if generate_steps:
                for p in prompts:  # one prompt at a time: the prompt's last position is its last token
                    enc = tokenizer(p, return_tensors="pt", truncation=True, max_length=max_length).to(device)
                    records.clear()
                    model.generate(**enc, max_new_tokens=generate_steps, min_new_tokens=generate_steps,
                                   do_sample=False, num_beams=num_beams, pad_token_id=pad)
                    last = torch.cat([r[:, -1, :] for r in records])  # every step, every beam
                    total = last.sum(0) if total is None else total + last.sum(0)
                    count += last.shape[0]
            else:
                for i in range(0, len(prompts), batch_size):
                    enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                    max_length=max_length).to(device)
                    mask = enc["attention_mask"]
                    records.clear()
                    model(**enc)
                    h = records[-1]
                    if reduce == "last_token":
                        # the last attended position per row, whichever side the tokenizer pads
                        pos = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
                        vec = h[torch.arange(h.shape[0]), pos]
                    else:
                        m = mask.unsqueeze(-1).to(h.dtype)
                        vec = (h * m).sum(1) / m.sum(1).clamp(min=1)
                    total = vec.sum(0) if total is None else total + vec.sum(0)
                    count += vec.shape[0]
    finally:
        handle.remove()
    assert total is not None
    return (total / count).cpu()


# -- parameter-space prior (SG-LoRA) ------------------------------------------------------------------

def semantic_prior(query_emb: torch.Tensor, task_embs: torch.Tensor, prototypes: torch.Tensor,
                   variances: torch.Tensor, *, k: int = 4, tau: float = DEFAULT_TAU,
                   leave_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SG-LoRA's sparse aggregator (arXiv 2509.10535, §3 and App. B):

        s_n = cos(d*, d_n),   S = top-K of s (over the tasks, ``leave_out`` excluded),
        α_n = exp(s_n/τ) / Σ_{m∈S} exp(s_m/τ) for n ∈ S, else 0,
        μ*  = Σ α_n μ_n,
        σ*² = Σ α_n σ_n² + Σ α_n (μ_n − μ*)⊙(μ_n − μ*)      (law of total variance of the mixture).

    Returns (μ* [D], σ*² [D], α [N]). K is clipped to the number of tasks available. τ is not stated in
    the paper; the default 0.1 is lorakit's choice. ``leave_out=n`` drops task n (a training task's own
    condition without itself; see :class:`~lorakit.generate.sg_lora.SGLoRA`).
    """
    q, embs = _float(query_emb, "query_emb"), _float(task_embs, "task_embs")
    protos, var = _float(prototypes, "prototypes"), _float(variances, "variances")
    if q.dim() != 1 or embs.dim() != 2 or embs.shape[1] != q.shape[0]:
        raise ConditionError(f"query_emb must be [E] and task_embs [N, E]; got {tuple(q.shape)}, {tuple(embs.shape)}")
    n = embs.shape[0]
    if protos.dim() != 2 or protos.shape[0] != n or var.shape != protos.shape:
        raise ConditionError(f"prototypes and variances must both be [N={n}, D]; got {tuple(protos.shape)}, "
                             f"{tuple(var.shape)}")
    if not tau > 0:
        raise ConditionError(f"tau must be > 0, got {tau!r}")
    if bool((var < 0).any()):
        raise ConditionError("variances must be non-negative")
    sim, top = top_k_tasks(q, embs, k, leave_out=leave_out)
    weights = torch.zeros(n, dtype=sim.dtype)
    weights[top] = torch.softmax(sim[top] / tau, dim=0)
    w = weights.unsqueeze(1).to(protos)
    mu = (w * protos).sum(0)
    var_star = (w * var).sum(0) + (w * (protos - mu) ** 2).sum(0)
    return mu, var_star, weights


def top_k_tasks(query_emb: torch.Tensor, task_embs: torch.Tensor, k: int,
                leave_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(d*, d_n) for every task [N] (−inf at ``leave_out``), indices of the top min(K, available))."""
    q, embs = _float(query_emb, "query_emb"), _float(task_embs, "task_embs")
    if q.dim() != 1 or embs.dim() != 2 or embs.shape[1] != q.shape[0]:
        raise ConditionError(f"query_emb must be [E] and task_embs [N, E]; got {tuple(q.shape)}, {tuple(embs.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConditionError(f"k must be a positive integer, got {k!r}")
    n = embs.shape[0]
    if leave_out is not None and not 0 <= leave_out < n:
        raise ConditionError(f"leave_out={leave_out} is not a task index (0..{n - 1})")
    sim = torch.nn.functional.cosine_similarity(embs, q.unsqueeze(0), dim=1)
    if leave_out is not None:
        sim[leave_out] = float("-inf")
    available = n - (leave_out is not None)
    if available < 1:
        raise ConditionError("the aggregator needs at least one task besides the one left out")
    return sim, torch.topk(sim, min(k, available)).indices


def _float(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ConditionError(f"{what} must be a float tensor")
    if not torch.isfinite(t).all():
        raise ConditionError(f"{what} holds NaN or inf")
    return t.float()
