"""Pure planners for multi-job training: token-capped packing, LoRAFusion's grouping and merge pass.

LoRAFusion (Zhu et al., EuroSys 2026, arXiv 2510.00206; code ``CentML/lorafusion``,
``lorafusion/solver/proposed_solver.py``) and, for the pad-to-max baseline, mLoRA (Ye et al., VLDB 2025;
``TUDB-Labs/mLoRA``, ``executor/dispatcher/dispatcher.py::_align_batch_tokens``).

Items are samples ``(key, adapter, length)``. A **bin** (micro-batch) is a list of item keys with each
adapter's items contiguous (one segment per adapter). Its cost under a cap C is, per ``cost``:

- ``"packed"`` (LoRAFusion's, ``greedy_pack_decide_bins``): Σ_a round_up(Σ_{s∈a} len_s, block), the
  token count of one packed sequence whose adapter segments are padded to the kernel block (128 there);
- ``"padded"`` (lorakit's runtime, right-padded rows): rows·max_len (round_up(max_len, block)), the
  tokens a padded [rows, T] micro-batch computes.

``plan(items, cap, method)`` returns bins with cost ≤ cap that place every item exactly once:

- ``"ffd"`` (default): first-fit-decreasing by length (ties by input order), as ``greedy_pack_decide_bins``;
  **divergence (lorakit's choice):** an item that alone exceeds the cap is refused with
  :class:`PlanError` (the code opens an over-cap bin for it);
- ``"milp"``: the min-bins MILP of ``solve_micro_milp_min_bins`` (x[s,b] binary, integer k[a,b] blocks with
  Σ_{s∈a} len_s·x[s,b] ≤ block·k[a,b], Σ_a block·k[a,b] ≤ C·used[b], used[b+1] ≤ used[b], minimise Σ used),
  then min(greedy, MILP) bins as ``solve_micro_milp_lexicographic`` (c). Needs ``pulp``; ``cost="packed"``
  only (the padded cost is not linear). The second, min-smallest-bin MILP (step d) is not implemented;
- ``"pad_to_max"``: mLoRA's dispatcher: every item of the step in one bin padded to the step's global
  max (rounded to ``block``; mLoRA uses 8), no cap, no packing.

:func:`group_adapters` is ``group_adapters`` of the code (head-tail pairing under the bubble lemma with the
k·σ lower bound) and :func:`merge_pass` / :func:`verify_schedule` follow LATER-ROWS §6.2's reading of
``apply_merge_pass_for_adapter_group_step_infos_impl_v2`` and ``verify_correctness_of_schedule``; both
matter only with pipeline stages S > 1 and are not used by the single-process trainer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

METHODS = ("ffd", "milp", "pad_to_max")
COSTS = ("packed", "padded")
LORAFUSION_BLOCK = 128  # triton_ops/config.py: fused_multi_lora_block_size_m
MLORA_ALIGN = 8  # mLoRA _align_batch_tokens


class PlanError(ValueError):
    """Inputs no plan satisfies (an item above the cap, an unknown method, pulp missing for the MILP)."""


@dataclass(frozen=True)
class Item:
    key: Hashable
    adapter: Hashable
    length: int


def _round_up(v: int, multiple: int) -> int:
    return ((v + multiple - 1) // multiple) * multiple


def bin_cost(items: Sequence[Item], cost: str = "padded", block: int = 1) -> int:
    """The tokens one bin costs (see the module docstring)."""
    if not items:
        return 0
    if cost == "packed":
        per: dict[Hashable, int] = {}
        for it in items:
            per[it.adapter] = per.get(it.adapter, 0) + it.length
        return sum(_round_up(v, block) for v in per.values())
    if cost == "padded":
        return len(items) * _round_up(max(it.length for it in items), block)
    raise PlanError(f"unknown cost {cost!r}; known: {', '.join(COSTS)}")


def _segmented(bin_items: list[Item], order: dict[Hashable, int]) -> list[Item]:
    """Each adapter's items contiguous (adapters in first-seen order, items in placement order)."""
    return sorted(bin_items, key=lambda it: order[it.adapter])


def plan(items: Sequence[Item], cap: int | None, method: str = "ffd", *, cost: str = "padded", block: int = 1,
         time_limit: int = 60) -> list[list[Item]]:
    """Bins (micro-batches) of ``items``, each adapter's items contiguous inside a bin."""
    if method not in METHODS:
        raise PlanError(f"unknown planner {method!r}; known: {', '.join(METHODS)}")
    if cost not in COSTS:
        raise PlanError(f"unknown cost {cost!r}; known: {', '.join(COSTS)}")
    if block < 1:
        raise PlanError(f"block must be >= 1, got {block}")
    items = list(items)
    if len({it.key for it in items}) != len(items):
        raise PlanError("item keys must be unique")
    if any(it.length < 1 for it in items):
        raise PlanError("every item needs length >= 1")
    if not items:
        return []
    order: dict[Hashable, int] = {}
    for it in items:
        order.setdefault(it.adapter, len(order))
    if method == "pad_to_max":
        return [_segmented(items, order)]
    if cap is None or cap < 1:
        raise PlanError(f"method {method!r} needs a token cap >= 1, got {cap}")
    over = [it for it in items if bin_cost([it], cost, block) > cap]
    if over:
        raise PlanError(f"{len(over)} item(s) exceed the token cap {cap} on their own (longest: {over[0].length} "
                        f"tokens, key {over[0].key!r}); raise the cap or truncate the samples")
    bins = ffd(items, cap, cost=cost, block=block)
    if method == "milp":
        if cost != "packed":
            raise PlanError("method 'milp' supports cost='packed' only (LoRAFusion's linear block cost)")
        milp_bins = milp_min_bins(items, cap, block=block, time_limit=time_limit)
        if milp_bins is not None and len(milp_bins) < len(bins):
            bins = milp_bins
    return [_segmented(b, order) for b in bins]


def ffd(items: Sequence[Item], cap: int, *, cost: str = "padded", block: int = 1) -> list[list[Item]]:
    """First-fit-decreasing: items by length, longest first (stable), each into the first bin it fits."""
    bins: list[list[Item]] = []
    for it in sorted(items, key=lambda it: -it.length):  # sorted is stable: ties keep input order
        for b in bins:
            if bin_cost([*b, it], cost, block) <= cap:
                b.append(it)
                break
        else:
            bins.append([it])
    return bins


def milp_min_bins(items: Sequence[Item], cap: int, *, block: int = 1, time_limit: int = 60
                  ) -> list[list[Item]] | None:
    """LoRAFusion's min-bins MILP (``solve_micro_milp_min_bins``) with pulp/CBC; None if not solved."""
    try:
        import pulp
    except ImportError as e:
        raise PlanError("planner 'milp' needs the optional package pulp (pip install pulp); "
                        "use planner 'ffd' otherwise") from e
    n = len(items)
    adapters = sorted({it.adapter for it in items}, key=str)
    prob = pulp.LpProblem("lorakit_micro_batches", pulp.LpMinimize)
    x = {(s, b): pulp.LpVariable(f"x_{s}_{b}", cat="Binary") for s in range(n) for b in range(n)}
    k = {(a, b): pulp.LpVariable(f"k_{i}_{b}", lowBound=0, cat="Integer")
         for i, a in enumerate(adapters) for b in range(n)}
    used = {b: pulp.LpVariable(f"used_{b}", cat="Binary") for b in range(n)}
    for s in range(n):
        prob += pulp.lpSum(x[s, b] for b in range(n)) == 1
    for a in adapters:
        for b in range(n):
            prob += pulp.lpSum(items[s].length * x[s, b] for s in range(n) if items[s].adapter == a) <= k[a, b] * block
    for b in range(n):
        prob += pulp.lpSum(k[a, b] * block for a in adapters) <= cap * used[b]
        prob += pulp.lpSum(x[s, b] for s in range(n)) <= n * used[b]
    for b in range(n - 1):
        prob += used[b + 1] <= used[b]
    prob += pulp.lpSum(used.values())
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    if prob.status != pulp.LpStatusOptimal:
        return None
    bins: list[list[Item]] = [[] for _ in range(n)]
    for s in range(n):
        for b in range(n):
            if (pulp.value(x[s, b]) or 0) > 0.5:
                bins[b].append(items[s])
                break
    return [b for b in bins if b]


def check_plan(items: Sequence[Item], bins: Sequence[Sequence[Item]], cap: int | None, *, cost: str = "padded",
               block: int = 1) -> None:
    """Raise PlanError unless every item is placed exactly once, no bin exceeds ``cap`` and each adapter's
    items are one contiguous segment of its bin."""
    placed = [it.key for b in bins for it in b]
    if sorted(map(repr, placed)) != sorted(repr(it.key) for it in items):
        raise PlanError("the plan does not place every item exactly once")
    for i, b in enumerate(bins):
        if cap is not None and bin_cost(b, cost, block) > cap:
            raise PlanError(f"bin {i} costs {bin_cost(b, cost, block)} > cap {cap}")
        seen: list[Hashable] = []
        for it in b:
            if seen and seen[-1] == it.adapter:
                continue
            if it.adapter in seen:
                raise PlanError(f"bin {i}: adapter {it.adapter!r} is split into several segments")
            seen.append(it.adapter)


# -- LoRAFusion's grouping and merge pass (pipeline stages S > 1) -------------------------------------

def group_adapters(data: Sequence[Sequence[Sequence[int]]], capacity: int, *, k_sigma: float = 0.25,
                   num_stages: int = 4) -> list[list[int]]:
    """``group_adapters`` of ``proposed_solver.py``: ``data[adapter][global_batch][sample] = length``.

    Per adapter, μ and σ (ddof 1) of all its lengths, gbs = size of its first global batch,
    n_μ = ⌈gbs·μ/C⌉ and n_lo = ⌈gbs·(μ − kσ)/C⌉. Bubble lemma: Σ_{others} n_lo ≥ S − 1, where the
    "others" exclude the adapter with the largest n_μ (first check) or the candidate pair. If the first
    check fails every adapter is a singleton; otherwise adapters sorted by μ (descending) are paired head
    with tail while the lemma holds without the pair, else the one with larger n_μ (the head on ties)
    becomes a singleton; a middle one left over is a singleton.
    """
    stats = []
    for a, batches in enumerate(data):
        flat = [v for b in batches for v in b]
        if not flat or not batches[0]:
            raise PlanError(f"adapter {a} has no samples")
        mu = sum(flat) / len(flat)
        sigma = (math.sqrt(sum((v - mu) ** 2 for v in flat) / (len(flat) - 1)) if len(flat) > 1 else 0.0)
        gbs = len(batches[0])
        stats.append({"idx": a, "mu": mu, "n_mu": math.ceil(gbs * mu / capacity),
                      "n_lo": math.ceil(gbs * (mu - k_sigma * sigma) / capacity)})

    def lemma(removed: list[int] | None = None) -> bool:
        if removed is None:
            best = max(range(len(stats)), key=lambda i: (stats[i]["n_mu"], -i))  # np.argmax: first maximum
            removed = [stats[best]["idx"]]
        return sum(s["n_lo"] for s in stats if s["idx"] not in removed) >= num_stages - 1

    if not lemma():
        return [[s["idx"]] for s in stats]
    stats.sort(key=lambda s: s["mu"], reverse=True)
    left, right = 0, len(stats) - 1
    groups: list[list[int]] = []
    while left < right:
        sl, sr = stats[left], stats[right]
        if lemma([sl["idx"], sr["idx"]]):
            groups.append([sl["idx"], sr["idx"]])
            left, right = left + 1, right - 1
        elif sl["n_mu"] < sr["n_mu"]:
            groups.append([sr["idx"]])
            right -= 1
        else:
            groups.append([sl["idx"]])
            left += 1
    if left == right:
        groups.append([stats[left]["idx"]])
    return groups


@dataclass
class MicroBatch:
    """One scheduled micro-batch: ``samples[(adapter, global_batch, sample)] = length``; empty = a bubble."""

    samples: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def batches(self) -> set[tuple[int, int]]:
        return {(a, g) for a, g, _ in self.samples}

    def cost(self, block: int) -> int:
        per: dict[int, int] = {}
        for (a, _, _), t in self.samples.items():
            per[a] = per.get(a, 0) + t
        return sum(_round_up(v, block) for v in per.values())


def _positions(schedule: Sequence[MicroBatch]) -> dict[tuple[int, int], list[int]]:
    pos: dict[tuple[int, int], list[int]] = {}
    for i, mb in enumerate(schedule):
        for key in mb.batches():
            pos.setdefault(key, []).append(i)
    return pos


def bubble_violations(schedule: Sequence[MicroBatch], num_stages: int) -> list[tuple[int, int, int]]:
    """(adapter, global batch g, gap) where batch g+1 of an adapter starts fewer than S micro-batches after
    batch g's last one (the bubble lemma: it cannot start before g has left an S-stage pipeline)."""
    pos = _positions(schedule)
    bad = []
    for (a, g), where in sorted(pos.items()):
        nxt = pos.get((a, g + 1))
        if nxt is not None and min(nxt) - max(where) < num_stages:
            bad.append((a, g, min(nxt) - max(where)))
    return bad


def _adapter_conflict(mb: MicroBatch, keys: set[tuple[int, int]]) -> bool:
    mine = mb.batches()
    return any((a, g) not in mine and any(a == a2 for a2, _ in mine) for a, g in keys)


def merge_pass(schedule: Sequence[MicroBatch], capacity: int, num_stages: int, *, block: int = LORAFUSION_BLOCK,
               delta: int = 1024, lookahead: int = 8) -> list[MicroBatch]:
    """Greedy left-to-right merge (LATER-ROWS §6.2 step 3): a micro-batch with ≥ ``delta`` free tokens
    looks ahead up to ``lookahead`` micro-batches; a whole partner moves in if it fits, else its samples,
    shortest first, while they fit. A move must keep the capacity, never put two global batches of one
    adapter into one micro-batch, and keep the bubble lemma (checked on the whole schedule after the move,
    as ``_bubble_ok_after_move``). Emptied micro-batches are dropped."""
    sched = [MicroBatch(dict(mb.samples)) for mb in schedule]
    i = 0
    while i < len(sched):
        cur = sched[i]
        for j in range(i + 1, min(len(sched), i + 1 + lookahead)):
            if capacity - cur.cost(block) < delta:
                break
            other = sched[j]
            if not other.samples:
                continue
            baseline = len(bubble_violations(sched, num_stages))
            moved = _try_move(sched, i, j, list(other.samples.items()), capacity, num_stages, block, baseline)
            if not moved:
                for key, t in sorted(other.samples.items(), key=lambda kv: kv[1]):
                    _try_move(sched, i, j, [(key, t)], capacity, num_stages, block, baseline)
        i += 1
    return [mb for mb in sched if mb.samples]


def _try_move(sched: list[MicroBatch], i: int, j: int, moving: list[tuple[tuple[int, int, int], int]],
              capacity: int, num_stages: int, block: int, baseline: int) -> bool:
    cur, other = sched[i], sched[j]
    keys = {(a, g) for (a, g, _), _t in moving}
    if _adapter_conflict(cur, keys):
        return False
    trial = MicroBatch({**cur.samples, **dict(moving)})
    if trial.cost(block) > capacity:
        return False
    rest = MicroBatch({k: v for k, v in other.samples.items() if k not in dict(moving)})
    candidate = [*sched[:i], trial, *sched[i + 1:j], rest, *sched[j + 1:]]
    if len(bubble_violations([mb for mb in candidate if mb.samples], num_stages)) > baseline:
        return False
    sched[i], sched[j] = trial, rest
    return True


def verify_schedule(data: Sequence[Sequence[Sequence[int]]], schedule: Sequence[MicroBatch], capacity: int,
                    num_stages: int, *, block: int = LORAFUSION_BLOCK, add_bubbles: bool = True
                    ) -> list[MicroBatch]:
    """Check every sample is used exactly once and no micro-batch exceeds ``capacity``; with ``add_bubbles``,
    insert empty micro-batches (LoRAFusion's no-op batches, ``EMPTY_BATCH_MAGIC_TOKEN``) before a global
    batch that starts too early, until the bubble lemma holds. Returns the (padded) schedule."""
    want = {(a, g, s) for a, batches in enumerate(data) for g, b in enumerate(batches) for s in range(len(b))}
    got = [k for mb in schedule for k in mb.samples]
    if len(got) != len(set(got)) or set(got) != want:
        raise PlanError("schedule does not use every sample exactly once")
    for i, mb in enumerate(schedule):
        if mb.cost(block) > capacity:
            raise PlanError(f"micro-batch {i} costs {mb.cost(block)} > capacity {capacity}")
    out = [MicroBatch(dict(mb.samples)) for mb in schedule]
    while add_bubbles:
        bad = bubble_violations(out, num_stages)
        if not bad:
            break
        a, g, gap = bad[0]
        first_next = min(i for i, mb in enumerate(out) if (a, g + 1) in mb.batches())
        out[first_next:first_next] = [MicroBatch() for _ in range(num_stages - gap)]
    if not add_bubbles and bubble_violations(out, num_stages):
        raise PlanError(f"bubble lemma violated: {bubble_violations(out, num_stages)[:3]}")
    return out


def schedule_from_groups(data: Sequence[Sequence[Sequence[int]]], groups: Sequence[Sequence[int]], capacity: int,
                         *, block: int = LORAFUSION_BLOCK) -> list[MicroBatch]:
    """The pre-merge schedule: for each global batch index, for each group, FFD over the group's samples
    (``packing_data_to_microbatches_micro_milp`` with the greedy packer); bins largest first."""
    n_batches = min(len(d) for d in data)
    out: list[MicroBatch] = []
    for g in range(n_batches):
        for group in groups:
            items = [Item((a, g, s), a, t) for a in group for s, t in enumerate(data[a][g])]
            bins = plan(items, capacity, "ffd", cost="packed", block=block)
            mbs = [MicroBatch({it.key: it.length for it in b}) for b in bins]
            out.extend(sorted(mbs, key=lambda mb: -mb.cost(block)))
    return out
