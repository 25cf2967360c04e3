"""Paged KV cache for Hugging Face decoder models (after vLLM's PagedAttention and S-LoRA's unified paging).

References: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, arXiv 2309.06180 (Sec. 4.1-4.3: fixed-size KV blocks, a block table per
sequence, blocks allocated on demand and freed when the sequence finishes); Sheng et al., "S-LoRA:
Serving Thousands of Concurrent LoRA Adapters", MLSys 2024, arXiv 2311.03285 (Sec. 4.1 "unified
paging": one memory pool, one budget, for KV-cache pages and adapter weight pages).

Layout
------
- ``PagedKVPool``: per model layer a K pool and a V pool of shape (capacity+1, kv_heads, page_tokens,
  head_dim) (head-major inside a page, so one ``index_select`` over (page, head) blocks yields the
  rows' K/V already contiguous in the (B, kv_heads, L, head_dim) layout attention wants; a
  token-major page layout made sdpa about 2x slower on the strided view). Page 0 is a zero page that
  is never allocated: block tables are padded with it. A page id names the same page in every layer
  (as in vLLM), so one block table per sequence serves all layers;
  one page holds ``page_bytes = 2 · layers · page_tokens · kv_heads · head_dim · elt`` bytes. Pages
  come from a LIFO free list; the pool grows on demand (amortized doubling, up to ``max_pages``), so
  physical memory follows the peak number of pages in use, not a preallocated maximum.
- ``PagedKVCache`` (a transformers ``Cache``): sequences by id, each a list of page ids and a length;
  no padding is stored. Before each forward the engine calls ``prepare(seq_ids, new_lens, q_len)``,
  which allocates the pages the new tokens need and builds, once for all layers, the flat write
  indices, the block table (B, n_blocks) padded with page 0 and a 4-D attention mask. Each layer's
  ``update`` then scatters the new (non-padding) tokens into their pages (``index_copy_``) and returns
  the rows' K/V gathered into a (B, kv_heads, L_max, head_dim) view, L_max = the longest row; the
  model's own attention (sdpa or eager) runs on it with the 4-D mask (key j of row b is visible to
  query i iff j < len_b and j <= past_b + i). Rows sit right-aligned at position 0 of their view,
  so a join or a leave changes no stored K/V: joining allocates the joiner's pages, leaving returns
  the leaver's pages to the free list (O(pages of that row)); nothing else moves.

Why gather, and what it costs: the pure-PyTorch attention needs contiguous per-row K/V, so each layer
gathers B·L_max·kv_heads·head_dim elements per step -- the same traffic as the dense ``DynamicCache``,
which re-concatenates the whole cache (``torch.cat``) at every step. A gather-free attention needs a
paged kernel (vLLM's paged attention, FlashInfer, flash-attn's block table); not done here: in pure
PyTorch a custom attention function registered through transformers' AttentionInterface would still
have to gather the pages (or score every page of the pool), so it would not save the copy.

Exactness: masked keys get weight exactly 0 (bool mask in sdpa, dtype-min additive mask in eager) and
stale page contents are finite, so the result equals the dense left-padded cache's up to float
summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVCacheFullError(RuntimeError):
    """The KV pool cannot hold more pages (its ``max_pages`` is reached)."""


def kv_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Hugging Face decoder config (Llama family, GPT-2)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


class PagedKVPool:
    """Per-layer K/V page pools with a shared free list (page id = the same page in every layer)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, page_tokens: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_pages: int | None = None, initial_pages: int = 16) -> None:
        if page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.page_tokens = page_tokens
        self.dtype, self.device = dtype, torch.device(device)
        self.max_pages = max_pages
        shape = (1, kv_heads, page_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.capacity = 0
        self.free: list[int] = []
        self.peak_pages = 0
        self._grow(max(1, min(initial_pages, max_pages or initial_pages)))

    @classmethod
    def for_model(cls, model, **kwargs) -> PagedKVPool:
        layers, kv_heads, head_dim = kv_dims(model.config)
        p = next(model.parameters())
        kwargs.setdefault("dtype", p.dtype)
        kwargs.setdefault("device", p.device)
        return cls(layers, kv_heads, head_dim, **kwargs)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, K and V."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_tokens * self.kv_heads * self.head_dim * elt

    @property
    def used_pages(self) -> int:
        return self.capacity - len(self.free)

    @property
    def pool_bytes(self) -> int:
        """Physical bytes of the pools (capacity + the zero page)."""
        return (self.capacity + 1) * self.page_bytes

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_tokens)

    def _grow(self, extra: int) -> None:
        old = self.capacity
        for store in (self.keys, self.values):
            for i, pool in enumerate(store):
                store[i] = torch.cat([pool, pool.new_zeros((extra, *pool.shape[1:]))])
        self.capacity = old + extra
        self.free.extend(range(self.capacity, old, -1))  # LIFO: lowest new id handed out first

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            limit = self.max_pages if self.max_pages is not None else float("inf")
            want = n - len(self.free)
            if self.capacity + want > limit:
                raise KVCacheFullError(f"KV pool full: need {n} page(s), {len(self.free)} free, "
                                       f"max_pages={self.max_pages}")
            self._grow(int(min(limit - self.capacity, max(want, self.capacity))))
        pages = [self.free.pop() for _ in range(n)]
        self.peak_pages = max(self.peak_pages, self.used_pages)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        self.free.extend(reversed(pages))  # stale contents are never read: no block table points to them


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens stored


@dataclass
class _Plan:
    """One forward's metadata, shared by all layers."""

    write_idx: torch.Tensor  # (N * H,) flat row ids ((page * H + head) * page_tokens + offset) of the new tokens
    src_idx: torch.Tensor | None  # (N,) their index in the flattened (B * q_len) new tokens; None = all
    block_flat: torch.Tensor  # (B * H * n_blocks,) (page * H + head) block ids, pages padded with page 0
    n_blocks: int
    kv_len: int  # L_max
    mask: torch.Tensor  # (B, 1, q_len, L_max) bool, True = attend
    seq_ids: list[int]
    new_lens: list[int]


class PagedLayer(CacheLayerMixin):
    """The layer view transformers calls: ``update`` writes into the pool and returns the gathered rows."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: PagedKVCache, layer_idx: int) -> None:
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pools exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache._update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.cache.plan
        return (plan.kv_len if plan is not None else query_length), 0

    def get_seq_length(self) -> int:
        plan = self.cache.plan
        return 0 if plan is None else plan.kv_len - max(plan.new_lens, default=0)

    def get_max_length(self) -> int:
        return -1


class PagedKVCache(Cache):
    """A transformers ``Cache`` over a ``PagedKVPool``: block tables per sequence, no stored padding.

    Use: ``add(sid)`` per new sequence; per forward ``prepare(sids, new_lens, q_len)``, pass
    ``cache.plan.mask`` (through ``attention_mask_for``) as the model's 4-D ``attention_mask`` and
    explicit ``position_ids``, then ``commit()``; ``remove(sid)`` returns its pages.
    """

    def __init__(self, pool: PagedKVPool) -> None:
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.num_layers)])
        self.pool = pool
        self.seqs: dict[int, _Seq] = {}
        self.plan: _Plan | None = None

    # ------------------------------------------------------------ sequences
    def add(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise KeyError(f"sequence {seq_id} already in the cache")
        self.seqs[seq_id] = _Seq()

    def remove(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(seq.pages)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    @property
    def used_pages(self) -> int:
        return sum(len(s.pages) for s in self.seqs.values())

    # ------------------------------------------------------------ one forward
    def prepare(self, seq_ids: Sequence[int], new_lens: Sequence[int], q_len: int) -> _Plan:
        """Allocate pages for ``new_lens[b]`` new tokens of each row and build the forward's plan.

        The input of the forward is (B, q_len) with row b's real tokens first (right padding)."""
        T, dev = self.pool.page_tokens, self.pool.device
        seqs = [self.seqs[s] for s in seq_ids]
        for seq, n in zip(seqs, new_lens, strict=True):
            need = self.pool.pages_for(seq.length + n) - len(seq.pages)
            if need > 0:
                seq.pages.extend(self.pool.alloc(need))
        B = len(seqs)
        past = torch.tensor([s.length for s in seqs], dtype=torch.long)
        new = torch.tensor(list(new_lens), dtype=torch.long)
        total = past + new
        kv_len = int(total.max())
        n_blocks = self.pool.pages_for(kv_len)
        table = torch.tensor([s.pages + [0] * (n_blocks - len(s.pages)) for s in seqs], dtype=torch.long)
        i = torch.arange(q_len)
        pos = past[:, None] + i[None, :]  # (B, q)
        valid = i[None, :] < new[:, None]
        H = self.pool.kv_heads
        heads = torch.arange(H)
        page = table.gather(1, (pos // T).clamp(max=n_blocks - 1))
        write = ((page * (H * T) + pos % T)[valid][:, None] + heads[None, :] * T).reshape(-1)
        blocks = (table[:, None, :] * H + heads[None, :, None]).reshape(-1)
        src = None if bool(valid.all()) else (torch.arange(B)[:, None] * q_len + i[None, :])[valid]
        j = torch.arange(kv_len)
        mask = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < total[:, None, None])
        self.plan = _Plan(write.to(dev), None if src is None else src.to(dev), blocks.to(dev), n_blocks,
                          kv_len, mask[:, None].to(dev), list(seq_ids), list(new_lens))
        return self.plan

    def commit(self) -> None:
        plan, self.plan = self.plan, None
        if plan is not None:
            for sid, n in zip(plan.seq_ids, plan.new_lens, strict=True):
                self.seqs[sid].length += n

    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        plan = self.plan
        if plan is None:
            raise RuntimeError("PagedKVCache: call prepare() before the forward")
        B, H, q, D = key_states.shape
        out = []
        for states, pool in ((key_states, self.pool.keys[layer_idx]), (value_states, self.pool.values[layer_idx])):
            flat = states.transpose(1, 2).reshape(B * q, H, D)
            if plan.src_idx is not None:
                flat = flat.index_select(0, plan.src_idx)
            pool.view(-1, D).index_copy_(0, plan.write_idx, flat.reshape(-1, D).to(pool.dtype))
            T = self.pool.page_tokens
            rows = pool.view(-1, T, D).index_select(0, plan.block_flat).view(B, H, plan.n_blocks * T, D)
            out.append(rows[:, :, :plan.kv_len])
        return out[0], out[1]

    # ------------------------------------------------------------ Cache API the engine does not need
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length()

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("PagedKVCache serves greedy/sampled decoding only; for beam search use "
                                  "ServingEngine(kv='dense') or model.generate")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedKVCache cannot crop (no speculative decoding); use ServingEngine(kv='dense')")


def attention_mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """The 4-D bool mask in the form the model's attention implementation expects (bool for sdpa,
    additive dtype-min for eager); transformers passes a 4-D mask through unchanged."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"the paged KV cache supports attn_implementation 'sdpa' and 'eager', not {impl!r}")
