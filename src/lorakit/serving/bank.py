"""AdapterBank: thousands of LoRA adapters in host memory, a byte-budgeted paged device pool.

Design (after S-LoRA, Sheng et al., MLSys 2024, arXiv 2311.03285, Sec. 4 "unified paging"; Punica,
Chen et al., MLSys 2024, arXiv 2310.18547; vLLM's LRU adapter cache):

- Host side: every registered adapter is kept as, per target module, ``A`` (r, in) and ``Bᵀ·s``
  (r, out) with the scale s = α/r (or α/√r, rsLoRA) folded into B, zero-padded to whole pages and
  laid out exactly as the device pages (pinned memory on CUDA), so an upload is one indexed copy
  per module.
- Device side, per target module ℓ: two page pools ``A_pool`` (P+1, page, in) and ``Bt_pool``
  (P+1, page, out). A page holds ``page_rows`` rank-rows of A and of Bᵀ. An adapter of rank r_ℓ uses
  ceil(r_ℓ/page) pages of module ℓ (any free ones, not contiguous), so heterogeneous ranks waste less
  than one page per module (no padding to the largest rank). Page 0 is all zeros and never
  allocated: page tables are padded with it, so padded rank-rows contribute exactly 0.
  S-LoRA also pages the KV cache in the same pool because every row has width H; here A rows have
  width ``in`` and Bᵀ rows width ``out`` (k/v projections differ under GQA), so the pools are per
  module and the KV cache is left to the engine (noted as a simplification).
- Budget in BYTES: the pools are preallocated once, P pages per module with
  P = budget_bytes // Σ_ℓ page_bytes_ℓ, so device memory equals the budget. Used bytes count the
  pages actually held. Adapters with fewer target modules leave pages free in the others.
- Slots: a resident adapter owns a slot s; per module ``page_table[s]`` lists its pages and
  ``npages[s]`` how many (0 if it does not target the module). Slot -1 is the base model.
- Residency: an LRU (OrderedDict, O(1) touch/evict) of resident, unpinned, not-in-use adapters;
  pinned adapters and those used by running requests (reference count) are never evicted. Eviction
  takes the least recently used adapters that hold pages in a module where the newcomer is short
  (with identical target sets that is plain LRU; it never evicts an adapter that frees nothing useful).
- Attach (host → device) costs O(#target modules · pages of that adapter): free pages and slots
  come from free lists; nothing loops over the other loaded adapters.

Forms: adapters are read by the one factor model (``lorakit.core.factors``): FACTORED_AB forms (lora,
ffa, with rsLoRA, per-module ranks via ``module_args``) are served exactly, relative to the original
base (an adapter whose init rewrote the base, PiSSA/LoRA-GA/LDU/EVA-style, is served as
[s·B, −s·B0]·[A; A0], rank 2r). Other MERGEABLE forms are served through the SVD at ``export_rank``
(best rank-k approximation, error reported in ``bank.export_errors``); without ``export_rank`` they
are refused with a clear message, as are
input-dependent forms and adapters with a bias term.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.factors import FactorError, state_factors
from lorakit.core.layer import AdaptedLayer
from lorakit.core.state import AdapterState
from lorakit.io.peft import load_state

DEFAULT_SERVING_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterBankError(ValueError):
    """An adapter the bank cannot take, or a request it cannot satisfy."""


class BankFullError(AdapterBankError):
    """Not enough device pages even after evicting every evictable adapter."""


@dataclass
class HostAdapter:
    """One adapter in host memory, already in page layout: path -> (A pages, Bᵀ pages, rank)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, int]]
    nbytes_tensors: int  # bytes of the unpadded A and B at the pool dtype
    nbytes_pages: int  # bytes of the device pages it occupies
    pinned: bool = False
    slot: int = -1  # >= 0 when resident on the device
    in_use: int = 0  # running requests that use it
    pages: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> page ids when resident


class BankLayer:
    """Device page pools and page tables of one target module (what the kernels read)."""

    def __init__(self, path: str, in_features: int, out_features: int, num_pages: int, max_slots: int,
                 max_pages: int, page_rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.path = path
        self.in_features, self.out_features = in_features, out_features
        self.page_rows = page_rows
        self.A_pool = torch.zeros(num_pages + 1, page_rows, in_features, dtype=dtype, device=device)
        self.Bt_pool = torch.zeros(num_pages + 1, page_rows, out_features, dtype=dtype, device=device)
        self.page_table = torch.zeros(max_slots, max_pages, dtype=torch.long, device=device)
        self.npages = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.free_pages = list(range(num_pages, 0, -1))  # page 0 is the shared zero page
        self.resident = 0  # adapters resident with pages here
        self.version = 0  # bumped whenever a slot's pages change here (upload/evict): invalidates gather caches

    @property
    def page_bytes(self) -> int:
        return self.page_rows * (self.in_features + self.out_features) * self.A_pool.element_size()

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (R, in), Bᵀ (R, out)) of the adapter in ``slot``, R = its pages · page_rows."""
        n = int(self.npages[slot])
        pages = self.page_table[slot, :n]
        return (self.A_pool[pages].reshape(-1, self.in_features),
                self.Bt_pool[pages].reshape(-1, self.out_features))


def _factors(state: AdapterState, base_layers: dict[str, nn.Module], export_rank: int | None,
             name: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Per module (A (k, in), B·s (out, k)) of ``state`` relative to the original base (``core.factors``:
    exact for factored forms, 2r with a base-rewriting init); SVD at ``export_rank`` otherwise."""
    cls = state.form_class()
    if Cap.MERGEABLE not in cls.caps:
        raise AdapterBankError(f"adapter {name!r}: form {cls.name!r} depends on the input (not MERGEABLE); "
                               "the serving bank serves LoRA-family adapters only")
    factored = Cap.FACTORED_AB in cls.caps
    if not factored and export_rank is None:
        raise AdapterBankError(f"adapter {name!r}: form {cls.name!r} is not a factored B·A form; pass "
                               "export_rank=k to serve its rank-k SVD export (see lorakit.io.export.export_lora)")
    missing = sorted(set(state.by_module()) - set(base_layers))
    if missing:
        raise AdapterBankError(f"adapter {name!r} targets module(s) {missing[:3]} that the bank does not serve; "
                               f"served: {sorted(base_layers)[:6]}...")
    try:
        factors = state_factors(state, base_layers, rank=export_rank, label=f"adapter {name!r}")
    except FactorError as e:
        raise AdapterBankError(str(e)) from e
    out, errors = {}, {}
    for path, f in factors.items():
        if f.bias is not None:
            raise AdapterBankError(f"adapter {name!r}: module {path} has a bias term (lora_bias), which the "
                                   "serving bank does not support")
        base = base_layers[path]
        if (f.B.shape[0], f.A.shape[1]) != (base.out_features, base.in_features):
            raise AdapterBankError(f"adapter {name!r}: module {path} is (out, in) = {(f.B.shape[0], f.A.shape[1])}, "
                                   f"the base layer is {(base.out_features, base.in_features)}: another base model")
        if not factored:
            errors[path] = f.error
        out[path] = (f.A.contiguous(), f.B.contiguous())
    return out, errors


class AdapterBank:
    """Adapters in host memory + a byte-budgeted paged device pool with LRU eviction and pinning.

    ``base_layers``: module path -> the base ``nn.Linear`` it adapts (``AdapterBank.for_model`` finds
    them). ``budget_bytes``: device bytes of the page pools. ``page_rows``: rank-rows per page.
    """

    def __init__(self, base_layers: dict[str, nn.Module], *, budget_bytes: int = 256 << 20, page_rows: int = 4,
                 max_rank: int = 128, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if page_rows < 1 or max_rank < 1:
            raise ValueError(f"page_rows and max_rank must be >= 1, got {page_rows}, {max_rank}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.page_rows = page_rows
        self.max_rank = max_rank
        self.base_layers = dict(base_layers)
        elt = torch.empty((), dtype=dtype).element_size()
        per_page = sum(page_rows * (lin.in_features + lin.out_features) * elt for lin in self.base_layers.values())
        self.num_pages = budget_bytes // per_page if per_page else 0
        if self.num_pages < 1:
            raise ValueError(f"budget_bytes={budget_bytes} holds no page (one page in every module takes "
                             f"{per_page} bytes)")
        self.budget_bytes = budget_bytes
        self.max_slots = self.num_pages  # every resident adapter holds >= 1 page somewhere
        max_pages = math.ceil(max_rank / page_rows)
        self.layers = {path: BankLayer(path, lin.in_features, lin.out_features, self.num_pages, self.max_slots,
                                       max_pages, page_rows, dtype, self.device)
                       for path, lin in self.base_layers.items()}
        self.adapters: dict[str, HostAdapter] = {}
        self.export_errors: dict[str, dict[str, float]] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident, unpinned, unused; oldest first
        self._free_slots = list(range(self.max_slots - 1, -1, -1))
        self._slot_owner: dict[int, str] = {}
        self.used_bytes = 0
        # Unified budget (S-LoRA): bytes of a budget shared with other users (the engine's KV pages) that
        # they hold, and the shared limit; adapters fit while used_bytes + reserved_bytes <= limit_bytes.
        self.reserved_bytes = 0
        self.limit_bytes = budget_bytes
        # acquires: acquire() calls (also those refused with BankFullError); hits: already resident
        self.stats = {"acquires": 0, "hits": 0, "uploads": 0, "evictions": 0}

    @classmethod
    def for_model(cls, model: nn.Module, targets: Iterable[str] = DEFAULT_SERVING_TARGETS, **kwargs) -> AdapterBank:
        """A bank over the Linear layers of ``model`` whose last name part is in ``targets``."""
        targets = set(targets)
        layers = {}
        for p, m in model.named_modules():
            base = m.base_layer if isinstance(m, AdaptedLayer) else m  # already adapted, served or routed
            if isinstance(base, nn.Linear) and p.rpartition(".")[2] in targets:
                layers[p] = base
        if not layers:
            raise ValueError(f"no Linear layer of the model matches targets {sorted(targets)}")
        if "device" not in kwargs:  # the device pool lives where the model computes (no silent CPU pool)
            kwargs["device"] = next(iter(layers.values())).weight.device
        return cls(layers, **kwargs)

    # ---------------------------------------------------------------- host registry
    def add(self, name: str, source: AdapterState | str | Path, *, export_rank: int | None = None,
            pin: bool = False) -> HostAdapter:
        """Register adapter ``name`` in host memory (an AdapterState or a PEFT/lorakit folder)."""
        if name in self.adapters:
            raise AdapterBankError(f"adapter {name!r} is already loaded; unload it first")
        state = load_state(source) if isinstance(source, (str, Path)) else source
        factors, errors = _factors(state, self.base_layers, export_rank, name)
        if errors:
            self.export_errors[name] = errors
        pr, elt = self.page_rows, torch.empty((), dtype=self.dtype).element_size()
        modules, nbytes, nbytes_pages = {}, 0, 0
        for path, (a, b) in factors.items():
            r = a.shape[0]
            if r > self.max_rank:
                raise AdapterBankError(f"adapter {name!r}: rank {r} at {path} exceeds the bank's max_rank "
                                       f"{self.max_rank}")
            n = math.ceil(r / pr)
            ap = torch.zeros(n * pr, a.shape[1], dtype=self.dtype)
            bp = torch.zeros(n * pr, b.shape[0], dtype=self.dtype)
            ap[:r] = a
            bp[:r] = b.T
            ap, bp = ap.view(n, pr, -1), bp.view(n, pr, -1)
            if self.device.type == "cuda":
                ap, bp = ap.pin_memory(), bp.pin_memory()
            modules[path] = (ap, bp, r)
            nbytes += r * (a.shape[1] + b.shape[0]) * elt
            nbytes_pages += self.layers[path].page_bytes * n
        host = HostAdapter(name, modules, nbytes, nbytes_pages, pinned=pin)
        self.adapters[name] = host
        if pin:
            self.acquire(name)
            host.in_use -= 1  # pinned: resident without a user
        return host

    def remove(self, name: str) -> None:
        """Unload ``name`` from host and device (refused while running requests use it)."""
        host = self._get(name)
        if host.in_use:
            raise AdapterBankError(f"adapter {name!r} is used by {host.in_use} running request(s)")
        if host.slot >= 0:
            self._evict(host)
        del self.adapters[name]
        self.export_errors.pop(name, None)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters stay resident (made resident now); unpinning makes them evictable again."""
        host = self._get(name)
        if pinned and not host.pinned:
            self.acquire(name)
            host.pinned = True
            host.in_use -= 1
        elif not pinned and host.pinned:
            host.pinned = False
            if host.slot >= 0 and host.in_use == 0:
                self._lru[name] = None

    # ---------------------------------------------------------------- residency
    def acquire(self, name: str | None) -> int:
        """Make ``name`` resident (evicting LRU adapters if needed), count a user; its slot (-1 = base)."""
        if name is None:
            return -1
        host = self._get(name)
        self.stats["acquires"] += 1
        if host.slot < 0:
            self._upload(host)
        else:
            self.stats["hits"] += 1
            self._lru.pop(name, None)
        host.in_use += 1
        return host.slot

    def release(self, name: str | None) -> None:
        if name is None:
            return
        host = self.adapters.get(name)
        if host is None or host.in_use <= 0:
            return
        host.in_use -= 1
        if host.in_use == 0 and not host.pinned and host.slot >= 0:
            self._lru[name] = None  # most recently used at the end

    def slots(self, names: Iterable[str | None]) -> torch.Tensor:
        """Row slots for a batch: acquires each distinct adapter for the call's duration (caller releases)."""
        return torch.tensor([self.acquire(n) for n in names], dtype=torch.long, device=self.device)

    def resident(self) -> list[str]:
        return [self._slot_owner[s] for s in sorted(self._slot_owner)]

    def _get(self, name: str) -> HostAdapter:
        host = self.adapters.get(name)
        if host is None:
            raise AdapterBankError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters)[:10]}"
                                   + (" ..." if len(self.adapters) > 10 else ""))
        return host

    def _bytes_short(self, nbytes: int) -> bool:
        return self.used_bytes + self.reserved_bytes + nbytes > self.limit_bytes

    def free_bytes_for(self, nbytes: int) -> bool:
        """Evict idle (unpinned, unused) adapters, least recently used first, until ``nbytes`` more bytes
        of the shared limit are free (unified budget: KV growth evicts idle adapters); False if impossible."""
        for victim in list(self._lru):
            if not self._bytes_short(nbytes):
                break
            self._evict(self.adapters[victim])
            self.stats["evictions"] += 1
        return not self._bytes_short(nbytes)

    def _fits(self, host: HostAdapter) -> bool:
        return not self._bytes_short(host.nbytes_pages) and bool(self._free_slots) and all(
            len(self.layers[p].free_pages) >= ap.shape[0] for p, (ap, _, _) in host.modules.items())

    def _upload(self, host: HostAdapter) -> None:
        if not all(ap.shape[0] <= self.num_pages for ap, _, _ in host.modules.values()):
            raise BankFullError(f"adapter {host.name!r} needs more pages than the whole budget holds")
        if not self._fits(host):
            self._make_room(host)
        slot = self._free_slots.pop()
        nb = torch.cuda.is_available() and self.device.type == "cuda"
        for path, (ap, bp, _) in host.modules.items():
            layer = self.layers[path]
            n = ap.shape[0]
            pages = [layer.free_pages.pop() for _ in range(n)]
            idx = torch.tensor(pages, dtype=torch.long, device=self.device)
            layer.A_pool.index_copy_(0, idx, ap.to(self.device, non_blocking=nb))
            layer.Bt_pool.index_copy_(0, idx, bp.to(self.device, non_blocking=nb))
            layer.page_table[slot, :n] = idx
            layer.npages[slot] = n
            layer.resident += 1
            layer.version += 1
            host.pages[path] = pages
        host.slot = slot
        self._slot_owner[slot] = host.name
        self.used_bytes += host.nbytes_pages
        self.stats["uploads"] += 1

    def _short(self, host: HostAdapter) -> set[str]:
        """Modules where ``host`` lacks free pages."""
        return {p for p, (ap, _, _) in host.modules.items() if len(self.layers[p].free_pages) < ap.shape[0]}

    def _make_room(self, host: HostAdapter) -> None:
        """Evict least-recently-used adapters, oldest first, skipping those whose eviction would not
        help (no pages in a module that is short, and slots are not short)."""
        for victim in list(self._lru):  # stops at the first point where everything fits
            short = self._short(host)
            bytes_short = self._bytes_short(host.nbytes_pages)
            if not short and self._free_slots and not bytes_short:
                return
            other = self.adapters[victim]
            if not self._free_slots or bytes_short or short & other.pages.keys():
                self._evict(other)
                self.stats["evictions"] += 1
        if not self._fits(host):
            raise BankFullError(f"no device room for adapter {host.name!r} ({host.nbytes_pages} bytes): the "
                                f"resident adapters holding the pages it needs are pinned or in use "
                                f"(budget {self.budget_bytes} bytes)")

    def _evict(self, host: HostAdapter) -> None:
        slot = host.slot
        for path, pages in host.pages.items():
            layer = self.layers[path]
            layer.npages[slot] = 0
            layer.page_table[slot].zero_()
            layer.free_pages.extend(pages)  # stale page contents are never read: tables point elsewhere
            layer.resident -= 1
            layer.version += 1
        host.pages = {}
        host.slot = -1
        self._lru.pop(host.name, None)
        del self._slot_owner[slot]
        self._free_slots.append(slot)
        self.used_bytes -= host.nbytes_pages
