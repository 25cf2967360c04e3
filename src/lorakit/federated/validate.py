"""Checks on a client update before it may be aggregated. A bad update is rejected with a reason
(logged by the server and kept in the round report); it never reaches an aggregator."""

from __future__ import annotations

import dataclasses
import logging

import torch

from lorakit.core.spec import AdapterSpec, build_args
from lorakit.core.state import AdapterState
from lorakit.federated.base import ClientUpdate

log = logging.getLogger("lorakit.federated")


def validate_update(update: ClientUpdate, template: AdapterState, upload_names: tuple[str, ...], *,
                    expected_shapes: dict[str, tuple[int, ...]] | None = None,
                    max_rank: int | None = None) -> str | None:
    """None if ``update`` is fit to aggregate, else the reason it is not.

    ``template`` is the adapter every client builds (its modules and dimensions);
    ``expected_shapes`` gives exact shapes when all clients share one rank, else ranks may vary
    per client (one rank on all modules, at most ``max_rank``).
    """
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    state = update.state
    if state.spec.form != template.spec.form:
        return f"form {state.spec.form!r} but the federation uses {template.spec.form!r}"
    cls = template.form_class()
    wanted = {f"{path}.{cls.tensor_key(name)}"
              for path, tensors in template.by_module().items() for name in tensors if name in upload_names}
    got = set(state.tensors)
    if got != wanted:
        missing, extra = sorted(wanted - got), sorted(got - wanted)
        parts = ([f"missing {len(missing)} tensor(s), e.g. {missing[:2]}"] if missing else []) + \
                ([f"unexpected {len(extra)} tensor(s), e.g. {extra[:2]}"] if extra else [])
        return "; ".join(parts)
    for k, t in state.tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"{k}: not a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"{k}: {bad} non-finite value(s) (NaN/Inf)"
    if expected_shapes is not None:
        for k, shape in expected_shapes.items():
            if tuple(state.tensors[k].shape) != tuple(shape):
                return f"{k}: shape {tuple(state.tensors[k].shape)}, expected {tuple(shape)}"
        return None
    return _check_ranks(state, template, max_rank)


def _check_ranks(state: AdapterState, template: AdapterState, max_rank: int | None) -> str | None:
    """Heterogeneous ranks: A (r, in) and B (out, r) with one r on every module, r <= max_rank,
    and the spec's rank equal to r (the scale s = α/r depends on it)."""
    cls = template.form_class()
    ref = template.by_module()
    ranks = set()
    for path, tensors in state.by_module().items():
        A, B = tensors.get("lora_A"), tensors.get("lora_B")
        if A is None or B is None:
            continue
        in_f, out_f = ref[path]["lora_A"].shape[1], ref[path]["lora_B"].shape[0]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or B.shape[1] != A.shape[0]:
            return (f"{path}: A{tuple(A.shape)} and B{tuple(B.shape)} do not fit the module "
                    f"(expected A (r, {in_f}) and B ({out_f}, r))")
        r = A.shape[0]
        if r < 1 or (max_rank is not None and r > max_rank):
            return f"{path}: rank {r} outside [1, {max_rank}]"
        try:
            args = build_args(cls.Args, state.spec.args_for(path), owner=cls.name)
        except (TypeError, ValueError) as e:
            return f"invalid adapter spec ({e})"
        if getattr(args, "r", r) != r:
            return f"{path}: tensors have rank {r} but the spec says r={args.r}"
        ranks.add(r)
    if len(ranks) > 1:
        return f"one rank per client expected, got ranks {sorted(ranks)} on different modules"
    return None


def args_mismatch(spec: AdapterSpec, template: AdapterState) -> str | None:
    """None if ``spec`` builds the same form ``Args`` as ``template`` on every module, else the difference.

    Equal in meaning, not in spelling: omitted defaults, ``8`` vs ``8.0``, or a per-module override
    that restates the global value all build equal frozen ``Args``.
    """
    if spec.form != template.spec.form:
        return f"form {spec.form!r} but the federation uses {template.spec.form!r}"
    cls = template.form_class()
    for path in template.modules:
        try:
            got = build_args(cls.Args, spec.args_for(path), owner=f"form {cls.name!r}")
        except (TypeError, ValueError) as e:
            return f"invalid adapter spec ({e})"
        want = build_args(cls.Args, template.spec.args_for(path), owner=f"form {cls.name!r}")
        if got != want:
            diff = ", ".join(f"{f.name}={getattr(got, f.name)!r} (federation: {getattr(want, f.name)!r})"
                             for f in dataclasses.fields(want) if getattr(got, f.name) != getattr(want, f.name))
            return f"{path}: adapter args differ from the federation's: {diff}"
    return None
