"""Serving engine: one base causal LM, many LoRA adapters per batch, continuous batching.

- ``serve_model(model, bank)`` replaces each target ``nn.Linear`` by a ``ServedLinear`` that adds,
  per batch row, the LoRA update of that row's adapter through ``lorakit.serving.kernels`` (prefill
  and decode alike); the rows' adapter slots for the current forward live in a shared
  ``ServingContext`` (one ``RowPlan`` per step, shared by all layers).
- ``ServingEngine``: requests join (batched, left-padded prefill) and leave (rows dropped from the
  batch KV cache) at every step; greedy or sampled decoding (temperature, top-k, top-p, per-request
  seed); stop on EOS / stop token ids / stop token sequences / max_new_tokens / context length;
  streaming through ``step()`` events or ``stream()``; cancel frees the row and the adapter;
  admission control counts rows, KV-cache bytes (padded batch) and adapter residency (an adapter that
  cannot be made resident keeps its request queued); a bounded queue refuses instead of growing.

KV cache: one Hugging Face ``DynamicCache`` for the running batch, left-padded with an attention
mask and explicit position ids (simple and exact; S-LoRA's paged KV cache and transformers'
continuous-batching paged cache are the faster designs, left for later: the latter flattens all
sequences into one ragged row, which needs per-token adapter slots — RowPlan already supports them
with tokens_per_row=1 over a flattened batch).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.serving.bank import AdapterBank, AdapterBankError, BankFullError
from lorakit.serving.kernels import RowPlan, batched_lora


class ServingContext:
    """What every ServedLinear reads during one forward: the step's RowPlan and the kernel backend."""

    def __init__(self, backend: str = "auto", path: str = "auto") -> None:
        self.plan: RowPlan | None = None
        self.backend = backend
        self.path = path

    def set_rows(self, slots: torch.Tensor, tokens_per_row: int) -> None:
        self.plan = RowPlan.build(slots, tokens_per_row=tokens_per_row, path=self.path)


class ServedLinear(nn.Module):
    """A base Linear plus the bank's per-row LoRA updates for the current batch."""

    def __init__(self, base_layer: nn.Linear, bank_layer, ctx: ServingContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank_layer = bank_layer
        self.ctx = ctx

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.ctx.plan
        if plan is not None and plan.any_active and self.bank_layer.resident:
            out = batched_lora(x, out, self.bank_layer, plan, backend=self.ctx.backend)
        return out


def serve_model(model: nn.Module, bank: AdapterBank, ctx: ServingContext | None = None) -> ServingContext:
    """Wrap the bank's target Linear layers of ``model`` in place; returns the shared context."""
    ctx = ctx or ServingContext()
    for path, layer in bank.layers.items():
        module = model.get_submodule(path)
        if isinstance(module, ServedLinear):
            module.bank_layer, module.ctx = layer, ctx
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, ServedLinear(module, layer, ctx))
    return ctx


def unserve_model(model: nn.Module) -> nn.Module:
    """Put the original Linear layers back."""
    for path, module in list(model.named_modules()):
        if isinstance(module, ServedLinear):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.base_layer)
    return model


class QueueFullError(RuntimeError):
    """The engine's bounded queue is full (HTTP 429/503)."""


@dataclass
class Request:
    prompt: Sequence[int]
    adapter: str | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_sequences: Sequence[Sequence[int]] = ()
    ignore_eos: bool = False
    return_logits: bool = False
    id: int = -1
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    _generator: torch.Generator | None = None
    _slot: int = -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    request_id: int
    token: int | None
    finished: bool
    finish_reason: str | None = None


class ServingEngine:
    def __init__(self, model: nn.Module, bank: AdapterBank, *, max_batch: int = 32, max_queue: int = 1024,
                 kv_budget_bytes: int | None = None, max_context: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, backend: str = "auto", path: str = "auto",
                 pad_token_id: int = 0) -> None:
        self.model = model.eval()
        self.bank = bank
        self.ctx = serve_model(model, bank, ServingContext(backend, path))
        cfg = model.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = max_context or getattr(cfg, "max_position_embeddings", 2048)
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = pad_token_id
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        elt = next(model.parameters()).element_size()
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elt
        self.kv_budget_bytes = kv_budget_bytes
        self.device = next(model.parameters()).device
        self.queue: deque[Request] = deque()
        self.rows: list[Request] = []
        self.cache = None  # DynamicCache of the running rows
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self.pos: torch.Tensor | None = None  # (B,) next position id
        self._ids = itertools.count()
        self._cancelled: set[int] = set()
        self._events: list[TokenEvent] = []  # finishes outside the batch (errors, cancelled while queued)
        self.requests: dict[int, Request] = {}  # unfinished requests by id

    # ------------------------------------------------------------------ public API
    def submit(self, request: Request) -> int:
        if len(self.queue) >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} waiting requests); retry later")
        if not request.prompt:
            raise ValueError("empty prompt")
        if len(request.prompt) + request.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the context length {self.max_context}")
        if request.adapter is not None:
            self.bank._get(request.adapter)  # unknown adapter: clear error now
        request.id = next(self._ids)
        if request.seed is not None:
            request._generator = torch.Generator(device="cpu").manual_seed(request.seed)
        self.queue.append(request)
        self.requests[request.id] = request
        return request.id

    def cancel(self, request_id: int) -> None:
        """Drop a request (client gone); its row and adapter are freed at the next step."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.queue:
            self.queue.remove(req)
            self._finish(req, "cancelled", in_batch=False)
        else:
            self._cancelled.add(request_id)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows and not self._events

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One scheduler step: drop cancelled rows, admit and prefill joiners, decode the others."""
        events, self._events = self._events, []
        if self._cancelled:
            for req in self.rows:
                if req.id in self._cancelled:
                    req.finish_reason = "cancelled"
                    events.append(TokenEvent(req.id, None, True, "cancelled"))
            self._cancelled.clear()
            self._drop_finished()
        decoding = len(self.rows)
        joiners = self._admit()
        if decoding:
            events += self._decode()
        if joiners:
            events += self._prefill(joiners)
        self._drop_finished()
        return events

    def stream(self) -> Iterator[TokenEvent]:
        while not self.idle:
            yield from self.step()

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        for r in requests:
            self.submit(r)
        for _ in self.stream():
            pass
        return list(requests)

    # ------------------------------------------------------------------ scheduling
    def _kv_fits(self, extra: list[Request]) -> bool:
        if self.kv_budget_bytes is None:
            return True
        reqs = self.rows + extra
        longest = max(len(r.prompt) + r.max_new_tokens for r in reqs)
        return len(reqs) * longest * self.kv_bytes_per_token <= self.kv_budget_bytes

    def _admit(self) -> list[Request]:
        joiners: list[Request] = []
        while self.queue and len(self.rows) + len(joiners) < self.max_batch:
            req = self.queue[0]
            if not self._kv_fits(joiners + [req]):
                if not self.rows and not joiners:
                    self.queue.popleft()
                    req.error = "request needs more KV-cache memory than the whole budget"
                    self._finish(req, "error", in_batch=False)
                    continue
                break
            try:
                req._slot = self.bank.acquire(req.adapter)
            except BankFullError as e:
                if not self.rows and not joiners:
                    self.queue.popleft()
                    req.error = str(e)
                    self._finish(req, "error", in_batch=False)
                    continue
                break  # wait until a running request releases its adapter
            except AdapterBankError as e:  # removed since submit
                self.queue.popleft()
                req.error = str(e)
                self._finish(req, "error", in_batch=False)
                continue
            joiners.append(self.queue.popleft())
        return joiners

    def _forward(self, ids, mask, pos, cache, slots, tokens_per_row):
        self.ctx.set_rows(slots, tokens_per_row)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True)
        finally:
            self.ctx.plan = None
        return out.logits[:, -1].float(), out.past_key_values

    def _prefill(self, joiners: list[Request]) -> list[TokenEvent]:
        from transformers import DynamicCache

        length = max(len(r.prompt) for r in joiners)
        ids = torch.full((len(joiners), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(joiners), length, dtype=torch.long)
        for i, r in enumerate(joiners):
            ids[i, length - len(r.prompt):] = torch.tensor(list(r.prompt))
            mask[i, length - len(r.prompt):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        slots = torch.tensor([r._slot for r in joiners], dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        logits, cache = self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device), cache,
                                      slots.to(self.bank.device), length)
        self._merge(joiners, cache, mask.to(self.device), mask.sum(-1).to(self.device))
        return self._emit(joiners, logits)

    def _decode(self) -> list[TokenEvent]:
        b = len(self.rows)
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)
        slots = torch.tensor([r._slot for r in self.rows], dtype=torch.long, device=self.bank.device)
        logits, self.cache = self._forward(ids, mask, self.pos[:, None], self.cache, slots, 1)
        self.mask, self.pos = mask, self.pos + 1
        return self._emit(self.rows, logits)

    def _merge(self, joiners: list[Request], cache, mask: torch.Tensor, pos: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.pos = list(joiners), cache, mask, pos
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)

        def lpad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([lpad(mine.keys, length - old_len, 2), lpad(theirs.keys, length - new_len, 2)])
            mine.values = torch.cat([lpad(mine.values, length - old_len, 2),
                                     lpad(theirs.values, length - new_len, 2)])
        self.mask = torch.cat([lpad(self.mask, length - old_len, 1), lpad(mask, length - new_len, 1)])
        self.pos = torch.cat([self.pos, pos])
        self.rows = self.rows + list(joiners)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        for r in self.rows:
            if r.finished:
                self.bank.release(r.adapter)
                self.requests.pop(r.id, None)
        if not keep:
            self.rows, self.cache, self.mask, self.pos = [], None, None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, idx)
        lead = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every remaining row
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        self.mask = mask[:, lead:]
        self.pos = self.pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    # ------------------------------------------------------------------ sampling and stopping
    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> list[TokenEvent]:
        events = []
        for i, req in enumerate(reqs):
            row = logits[i]
            if req.return_logits:
                req.logits.append(row.detach().cpu().clone())
            tok = sample(row, req.temperature, req.top_k, req.top_p, req._generator)
            req.tokens.append(tok)
            reason = self._stop_reason(req, tok)
            if reason:
                req.finish_reason = reason
            events.append(TokenEvent(req.id, tok, bool(reason), reason))
        return events

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        if (tok in self.eos and not req.ignore_eos) or tok in req.stop_token_ids:
            return "stop"
        for seq in req.stop_sequences:
            if seq and len(req.tokens) >= len(seq) and req.tokens[-len(seq):] == list(seq):
                return "stop"
        if len(req.tokens) >= req.max_new_tokens or len(req.prompt) + len(req.tokens) >= self.max_context:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, *, in_batch: bool) -> None:
        req.finish_reason = reason
        self.requests.pop(req.id, None)
        if in_batch:
            self.bank.release(req.adapter)
        else:
            self._events.append(TokenEvent(req.id, None, True, reason))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Greedy when temperature == 0, else temperature / top-k / top-p (nucleus) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits[order[drop]] = float("-inf")
    probs = F.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
