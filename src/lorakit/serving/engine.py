"""Serving engine: one base causal LM, many LoRA adapters per batch, continuous batching.

- ``serve_model(model, bank)`` puts a ``PagedSource`` (a delta source of the one ``AdaptedLayer``,
  ``core.sources``) into each target layer: it adds, per batch row, the LoRA update of that row's
  adapter through the ``paged`` op of ``lorakit.serving.kernels`` (prefill and decode alike). The
  engine writes the rows' slot ids and the step's ``RowPlan`` (built once per step by the shared
  ``ServingContext``) into the per-forward ``AdapterContext``. Layers can hold other sources too, so a
  routed composition (a router's stacks) or attached lorakit adapters are served in the same forward.
- ``ServingEngine``: requests join (batched prefill: left-padded for the dense cache, right-padded
  with padding never stored for the paged one) and leave (rows dropped from the batch KV cache, or
  their pages freed) at every step; greedy or sampled decoding (temperature, top-k, top-p, per-request
  seed); stop on EOS / stop token ids / stop token sequences / max_new_tokens / context length;
  streaming through ``step()`` events or ``stream()``; cancel frees the row and the adapter;
  admission control counts rows, KV-cache bytes (padded batch, or reserved pages) and adapter residency
  (with ``unified_budget_bytes``, KV and adapter pages in one budget) (an adapter that
  cannot be made resident keeps its request queued); a bounded queue refuses instead of growing.

KV cache, two implementations (``kv=``):

- ``"dense"`` (default): one Hugging Face ``DynamicCache`` for the running batch, left-padded with an
  attention mask and explicit position ids. A join concatenates the joiners' caches with left padding
  and a leave index-selects the whole cache (both copy every row); admission counts the padded
  batch's bytes (rows × longest prompt+max_new_tokens) against ``kv_budget_bytes``.
- ``"paged"``: ``lorakit.serving.kv.PagedKVCache`` (vLLM/S-LoRA style): fixed-size pages of
  ``page_tokens`` tokens, a block table per request, pages allocated on demand as the request grows
  and returned when it finishes, no padding stored; joins and leaves touch only that request's pages.
  Admission RESERVES, per request, the pages of prompt + max_new_tokens (capped at the context
  length) -- a conservative policy with no preemption: a running request can never run out of KV
  memory; pages are still allocated physically on demand, so the pages in use (``kv_stats``) are
  usually below the reservation. Budget: ``kv_budget_bytes`` (KV alone) or
  ``unified_budget_bytes`` (S-LoRA unified paging, Sheng et al., MLSys 2024, arXiv 2311.03285, Sec. 4.1):
  one byte budget shared by adapter pages and KV pages: the bank's ``limit_bytes`` is the unified
  budget and its ``reserved_bytes`` the KV reservation, so an adapter upload fits only in bytes not
  reserved for KV, and a KV reservation evicts idle (unpinned, unused) adapters, least recently used
  first (``AdapterBank.free_bytes_for``). Honest scope: the budget is one shared byte ACCOUNT over two
  physical pools (adapter pages have shape page_rows × (in+out) per module, KV pages page_tokens ×
  kv_heads × head_dim per layer): the bank's pools stay preallocated at the bank's ``budget_bytes``
  and the KV pool grows on demand up to ``unified_budget_bytes // page_bytes`` pages, so physical
  memory can exceed the unified budget by the bank's preallocation; S-LoRA's single physical buffer
  (one page = one H-wide vector) is not reproduced.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.context import AdapterContext, use_context
from lorakit.core.layer import AdaptedLayer
from lorakit.core.sources import DeltaSource, add_source, remove_source, sources
from lorakit.serving.bank import AdapterBank, AdapterBankError, BankFullError
from lorakit.serving.kernels import RowPlan, batched_lora
from lorakit.serving.kv import PagedKVCache, PagedKVPool, attention_mask_for


class ServingContext:
    """The engine's row plans: one ``RowPlan`` per step (reused across decode steps with the same slots)
    and the kernel backend; what every ``PagedSource`` reads during one forward."""

    def __init__(self, backend: str = "auto", path: str = "auto", gather_cache_bytes: int = 64 << 20) -> None:
        self.plan: RowPlan | None = None
        self.backend = backend
        self.path = path
        self.gather_cache_bytes = gather_cache_bytes
        self._last: RowPlan | None = None

    def set_rows(self, slots: torch.Tensor, tokens_per_row: int) -> None:
        """The step's plan. Decode steps with the same row slots as the previous one reuse its plan and
        so its per-layer gathered adapter weights (``RowPlan.gathered``; entries are checked against the
        bank layer's version, so an upload/evict in between can never serve stale pages)."""
        flat, last = slots.reshape(-1).long(), self._last
        if (tokens_per_row == 1 and last is not None and last.tokens_per_row == 1
                and last.slots.shape == flat.shape and torch.equal(last.slots, flat)):
            self.plan = last
            return
        self.plan = self._last = RowPlan.build(flat, tokens_per_row=tokens_per_row, path=self.path)
        self.plan.gather_limit = self.gather_cache_bytes if tokens_per_row == 1 else 0

    def forget(self) -> None:
        """Drop the reused plan (and so its gather cache), e.g. when the engine goes idle."""
        self.plan = self._last = None


SERVING_SOURCE = "serving"  # the key of the bank's pools in AdaptedLayer.sources


class PagedSource(DeltaSource):
    """The serving bank's pages of one layer as a delta source: each row's adapter (by slot) from the
    step's ``RowPlan`` (the per-forward ``AdapterContext.plan``, else the ``ServingContext``'s)."""

    def __init__(self, bank_layer, serving: ServingContext) -> None:
        super().__init__()
        self.bank_layer = bank_layer  # a BankLayer (plain tensors, not a module)
        self.serving = serving

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        plan = ctx.plan if ctx is not None and isinstance(ctx.plan, RowPlan) else self.serving.plan
        if plan is not None and plan.any_active and self.bank_layer.resident:
            out = batched_lora(x, out, self.bank_layer, plan, backend=self.serving.backend)
        return out


def serve_model(model: nn.Module, bank: AdapterBank, ctx: ServingContext | None = None) -> ServingContext:
    """Install the bank's pools in the target layers of ``model`` in place; returns the shared context."""
    ctx = ctx or ServingContext()
    for path, layer in bank.layers.items():
        module = model.get_submodule(path)
        if isinstance(module, AdaptedLayer) and SERVING_SOURCE in module.sources:
            source = module.sources[SERVING_SOURCE]
            source.bank_layer, source.serving = layer, ctx
            continue
        add_source(model, path, SERVING_SOURCE, PagedSource(layer, ctx))
    return ctx


def unserve_model(model: nn.Module) -> nn.Module:
    """Take the bank's sources out (the original layers return where nothing else is attached)."""
    for path, _, _ in list(sources(model, SERVING_SOURCE)):
        remove_source(model, path, SERVING_SOURCE)
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
    # with finish_reason "error": the HTTP status that fits (400: the request can never run on this server,
    # 404: its adapter was unloaded, 500: an engine or server-side failure); a retry cannot fix any of them
    error_status: int = 500
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
                 pad_token_id: int = 0, kv: str = "dense", page_tokens: int = 16,
                 unified_budget_bytes: int | None = None) -> None:
        if kv not in ("dense", "paged"):
            raise ValueError(f"kv must be 'dense' or 'paged', got {kv!r}")
        if unified_budget_bytes is not None and kv != "paged":
            raise ValueError("unified_budget_bytes needs kv='paged' (the dense cache has no pages to account)")
        if unified_budget_bytes is not None and kv_budget_bytes is not None:
            raise ValueError("pass kv_budget_bytes (KV alone) or unified_budget_bytes (KV + adapters), not both")
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
        self.kv_mode = kv
        # project only the positions whose logits are used onto the vocabulary (HF ``logits_to_keep``)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.unified_budget_bytes = unified_budget_bytes
        self.kv_cache: PagedKVCache | None = None
        self._kv_reserved: dict[int, int] = {}  # request id -> reserved KV bytes (paged)
        self.kv_reserved_bytes = 0
        if kv == "paged":
            pool = PagedKVPool.for_model(model, page_tokens=page_tokens)
            limit = unified_budget_bytes if unified_budget_bytes is not None else kv_budget_bytes
            pool.max_pages = None if limit is None else limit // pool.page_bytes
            self.kv_cache = PagedKVCache(pool)
            if unified_budget_bytes is not None:
                bank.limit_bytes = unified_budget_bytes
                bank.reserved_bytes = 0
        self.kv_stats = {"peak_bytes": 0, "peak_reserved_bytes": 0}
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
        vocab = getattr(self.model.config, "vocab_size", None)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (vocab or t + 1)
                   for t in request.prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
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

    def users_of(self, name: str) -> tuple[int, int]:
        """(running, queued) requests for adapter ``name``."""
        running = sum(1 for r in self.rows if r.adapter == name and not r.finished)
        return running, sum(1 for r in self.queue if r.adapter == name)

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name`` from the bank; refused (``AdapterBankError``) while running or QUEUED
        requests use it, so a queued request never fails because its adapter went away."""
        self.bank._get(name)
        running, queued = self.users_of(name)
        if running or queued:
            raise AdapterBankError(f"adapter {name!r} is in use by {running} running and {queued} queued "
                                   "request(s); unload it when they have finished")
        self.bank.remove(name)

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
            try:
                events += self._prefill(joiners)
            except Exception as e:  # noqa: BLE001 - fail these requests (never lose them), keep serving
                events += self._fail_joiners(joiners, e)
        self._drop_finished()
        return events

    def _fail_joiners(self, joiners: list[Request], err: Exception) -> list[TokenEvent]:
        """Finish joiners whose prefill raised with an error event; release those not in the batch
        (the batch's rows are released by ``_drop_finished``)."""
        in_batch = {id(r) for r in self.rows}
        for r in joiners:
            r.error, r.finish_reason = f"engine error during prefill: {type(err).__name__}: {err}", "error"
            if id(r) not in in_batch:
                self.bank.release(r.adapter)
                self.requests.pop(r.id, None)
                if self.kv_cache is not None:
                    self._unreserve_kv(r)
        return [TokenEvent(r.id, None, True, "error") for r in joiners]

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

    def _kv_need(self, req: Request) -> int:
        """Bytes of the KV pages ``req`` reserves (paged): prompt + max_new_tokens, capped at the context."""
        pool = self.kv_cache.pool
        return pool.pages_for(min(len(req.prompt) + req.max_new_tokens, self.max_context)) * pool.page_bytes

    def _reserve_kv(self, req: Request) -> bool:
        """Reserve ``req``'s KV bytes; under a unified budget, evict idle adapters to make room."""
        need = self._kv_need(req)
        if self.unified_budget_bytes is not None:
            if not self.bank.free_bytes_for(need):
                return False
            self.bank.reserved_bytes += need
        elif self.kv_budget_bytes is not None and self.kv_reserved_bytes + need > self.kv_budget_bytes:
            return False
        self._kv_reserved[req.id] = need
        self.kv_reserved_bytes += need
        self.kv_stats["peak_reserved_bytes"] = max(self.kv_stats["peak_reserved_bytes"], self.kv_reserved_bytes)
        return True

    def _unreserve_kv(self, req: Request) -> None:
        need = self._kv_reserved.pop(req.id, 0)
        self.kv_reserved_bytes -= need
        if self.unified_budget_bytes is not None:
            self.bank.reserved_bytes -= need

    def _over_budget(self, req: Request) -> str | None:
        """Why ``req`` can never run, however long it waits (paged): more than the whole budget."""
        need = self._kv_need(req)
        host = self.bank.adapters.get(req.adapter) if req.adapter is not None else None
        if self.unified_budget_bytes is not None:
            pinned = sum(h.nbytes_pages for h in self.bank.adapters.values()
                         if h.pinned and h.slot >= 0 and h is not host)
            total = need + (host.nbytes_pages if host is not None else 0)
            if total + pinned > self.unified_budget_bytes:
                return (f"request needs {need} bytes of KV pages + {total - need} bytes of adapter pages, more than "
                        f"the unified budget of {self.unified_budget_bytes} bytes"
                        + (f" ({pinned} bytes held by pinned adapters)" if pinned else ""))
        elif self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            return f"request needs {need} bytes of KV pages, more than the KV budget of {self.kv_budget_bytes} bytes"
        return None

    def _admit(self) -> list[Request]:
        if self.kv_cache is not None:
            return self._admit_paged()
        joiners: list[Request] = []
        while self.queue and len(self.rows) + len(joiners) < self.max_batch:
            req = self.queue[0]
            if not self._kv_fits(joiners + [req]):
                if not self.rows and not joiners:
                    self.queue.popleft()
                    req.error = "request needs more KV-cache memory than the whole budget"
                    req.error_status = 400
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
                req.error, req.error_status = str(e), 404
                self._finish(req, "error", in_batch=False)
                continue
            joiners.append(self.queue.popleft())
        return joiners

    def _admit_paged(self) -> list[Request]:
        joiners: list[Request] = []
        while self.queue and len(self.rows) + len(joiners) < self.max_batch:
            req = self.queue[0]
            alone = not self.rows and not joiners
            try:
                why = self._over_budget(req)
                if why is not None:
                    req.error_status = 400
                    raise AdapterBankError(why)
                req._slot = self.bank.acquire(req.adapter)
            except BankFullError as e:
                if not alone:
                    break  # wait until a running request releases its adapter or KV pages
                self.queue.popleft()
                req.error = str(e)
                self._finish(req, "error", in_batch=False)
                continue
            except AdapterBankError as e:  # over the whole budget, or removed since submit
                self.queue.popleft()
                req.error = str(e)
                if req.error_status != 400:
                    req.error_status = 404
                self._finish(req, "error", in_batch=False)
                continue
            if not self._reserve_kv(req):
                self.bank.release(req.adapter)
                if not alone:
                    break
                self.queue.popleft()
                req.error = "request's KV pages do not fit in the budget (pinned adapters hold the rest)"
                req.error_status = 400
                self._finish(req, "error", in_batch=False)
                continue
            joiners.append(self.queue.popleft())
        return joiners

    def _forward_paged(self, reqs: list[Request], ids: torch.Tensor, new_lens: list[int]) -> torch.Tensor:
        """One forward of ``reqs`` (ids right-padded, (B, q)) over the paged cache; logits of each row's
        last new token."""
        cache = self.kv_cache
        b, q = ids.shape
        past = torch.tensor([cache.length(r.id) for r in reqs], dtype=torch.long)
        plan = cache.prepare([r.id for r in reqs], new_lens, q)
        pos = (past[:, None] + torch.arange(q)[None, :]).clamp(max=self.max_context - 1)
        slots = torch.tensor([r._slot for r in reqs], dtype=torch.long, device=self.bank.device)
        last = torch.tensor(new_lens, dtype=torch.long) - 1
        keep = {"logits_to_keep": last[:, None].to(self.device)} if self._keep_logits else {}
        self.ctx.set_rows(slots, q)
        try:
            with use_context(AdapterContext(ids=slots, plan=self.ctx.plan, target=SERVING_SOURCE)):
                out = self.model(input_ids=ids.to(self.device),
                                 attention_mask=attention_mask_for(self.model, plan.mask),
                                 position_ids=pos.to(self.device), past_key_values=cache, use_cache=True, **keep)
            cache.commit()
        finally:
            self.ctx.plan = None
            cache.plan = None
        used = cache.pool.used_pages * cache.pool.page_bytes
        self.kv_stats["peak_bytes"] = max(self.kv_stats["peak_bytes"], used)
        if self._keep_logits:
            return out.logits[:, -1].float()
        last = last.to(out.logits.device)
        return out.logits[torch.arange(b, device=out.logits.device), last].float()

    def kv_bytes_in_use(self) -> int:
        """Bytes of KV cache held now: pages in use (paged) or the cache tensors (dense, padding included)."""
        if self.kv_cache is not None:
            return self.kv_cache.used_pages * self.kv_cache.pool.page_bytes
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def _forward(self, ids, mask, pos, cache, slots, tokens_per_row):
        self.ctx.set_rows(slots, tokens_per_row)
        try:
            keep = {"logits_to_keep": 1} if self._keep_logits else {}
            with use_context(AdapterContext(ids=slots, plan=self.ctx.plan, target=SERVING_SOURCE)):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                 use_cache=True, **keep)
        finally:
            self.ctx.plan = None
        return out.logits[:, -1].float(), out.past_key_values

    def _prefill(self, joiners: list[Request]) -> list[TokenEvent]:
        from transformers import DynamicCache

        length = max(len(r.prompt) for r in joiners)
        if self.kv_cache is not None:
            ids = torch.full((len(joiners), length), self.pad_token_id, dtype=torch.long)
            for i, r in enumerate(joiners):
                ids[i, :len(r.prompt)] = torch.tensor(list(r.prompt))
                self.kv_cache.add(r.id)
            self.rows = self.rows + list(joiners)
            logits = self._forward_paged(joiners, ids, [len(r.prompt) for r in joiners])
            return self._emit(joiners, logits)
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
        if self.kv_cache is not None:
            ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long)
            return self._emit(self.rows, self._forward_paged(self.rows, ids, [1] * b))
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
                if self.kv_cache is not None:
                    self.kv_cache.remove(r.id)  # O(pages of this row): back to the free list
                    self._unreserve_kv(r)
        if not keep:
            self.ctx.forget()  # idle: release the reused plan and its gathered adapter weights
        if self.kv_cache is not None:
            self.rows = [self.rows[i] for i in keep]
            return
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
