"""A client's local round and the server's evaluation, the same code for every engine.

A :class:`Runtime` is what one process needs: the base model (loaded once), a copy of the original
weights of the adapted modules, the task, its non-IID client split and the objective. The plain
loop, the Flower ClientApp (one per simulated or real SuperNode) and the Flower ServerApp each use
one. Everything random in a client's round (a fresh adapter's init, batch sampling, dropout, DP
noise) is drawn from seeds derived from (run seed, round, client id), so a round gives the same
update whichever engine or process runs it.

How a client behaves follows the aggregator's declarations, never its name: ``fresh_adapters``
(start from a fresh adapter seeded per round and client instead of the global one),
``heterogeneous_ranks`` (train at this client's own rank from ``FedConfig.ranks``),
``seeded_tensors`` (left out of the upload) and ``form`` (the form trained).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.federated.base import Aggregator, ClientUpdate, GlobalState, base_delta_weights
from lorakit.federated.config import FedConfig
from lorakit.forms.base import is_conv1d

log = logging.getLogger("lorakit.federated")
ADAPTER = "fed"  # the adapter's name on the client's model
_RUNTIMES: dict[tuple, Runtime] = {}


class SimulatedFailure(RuntimeError):
    """Raised by a client listed in ``FedConfig.fail`` for this round (tests of dropouts)."""


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (not Python's salted hash)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_aggregator(cfg: FedConfig) -> Aggregator:
    """The configured aggregator with its ``Args`` (paper defaults overridden by ``cfg.method_args``)."""
    return cfg.make_aggregator()


def global_spec(cfg: FedConfig) -> AdapterSpec:
    """The adapter every client builds (before any per-client rank)."""
    return AdapterSpec(form=cfg.form(), form_args={"r": cfg.rank, "alpha": cfg.alpha}, targets=cfg.target_list())


def client_spec(cfg: FedConfig, client_id: int) -> AdapterSpec:
    """The global spec with this client's rank (``FedConfig.ranks``); α scales with r so s = α/r stays."""
    spec = global_spec(cfg)
    r = cfg.client_ranks()[client_id % cfg.clients]
    if r != cfg.rank:
        spec.form_args = {**spec.form_args, "r": r, "alpha": cfg.alpha * r / cfg.rank}
    return spec


class Runtime:
    """Model, data and split of one process (see the module docstring)."""

    def __init__(self, cfg: FedConfig, model: nn.Module | None = None, tokenizer: Any = None, task: Any = None) -> None:
        from lorakit.federated.partition import dirichlet_partition
        from lorakit.models import load_model
        from lorakit.train.objectives import make_objective
        from lorakit.train.run import load_data

        self.cfg = cfg
        torch.set_num_threads(max(1, cfg.threads))
        if model is None:
            model, tokenizer = load_model(cfg.model, progress=False)
        self.model, self.tokenizer = model.eval(), tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.task = task if task is not None else load_data(cfg.data, seed=cfg.seed, n_train=cfg.n_train or None,
                                                            n_eval=cfg.n_eval or None)
        self.objective = make_objective(self.task, tokenizer, max_length=cfg.max_length)
        labels = [ex.label for ex in self.task.train]
        self.partitions = dirichlet_partition(labels, cfg.clients, cfg.dirichlet_alpha, seed=cfg.seed,
                                              min_size=min(cfg.min_client_examples, len(labels) // cfg.clients))
        from lorakit.core.inject import find_targets

        self.paths = find_targets(self.model, global_spec(cfg))
        self.original = {p: self._weight(p).detach().clone() for p in self.paths}

    @classmethod
    def shared(cls, cfg: FedConfig) -> Runtime:
        """One runtime per process and data/model key (Flower reuses a process for many messages)."""
        key = cfg.runtime_key()
        rt = _RUNTIMES.get(key)
        if rt is None:
            _RUNTIMES.clear()  # one model in memory at a time
            rt = _RUNTIMES[key] = cls(cfg)
        rt.cfg = cfg
        return rt

    # -- base weights --------------------------------------------------------------------------
    def _layer(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def _weight(self, path: str) -> torch.Tensor:
        layer = self._layer(path)
        return layer.weight.T if is_conv1d(layer) else layer.weight

    def set_base(self, base_delta: Mapping[str, torch.Tensor]) -> None:
        """Base weights = the original ones + the merged delta (aggregators that merge into the base); no
        adapter may be attached."""
        deltas = base_delta_weights({k: v for k, v in base_delta.items() if _is_delta_key(k)})
        unknown = set(deltas) - set(self.original)
        if unknown:
            raise ValueError(f"base delta for modules that are not adapted: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for path, w0 in self.original.items():
                w = self._weight(path)
                w.copy_(w0 + deltas[path].to(w0.dtype) if path in deltas else w0)

    # -- adapters --------------------------------------------------------------------------------
    def template(self, aggregator: Aggregator) -> AdapterState:
        """The initial global adapter: what every client builds from the shared adapter seed."""
        import lorakit

        aggregator.check_spec(global_spec(self.cfg))
        self.set_base({})
        lorakit.attach(self.model, global_spec(self.cfg), ADAPTER, seed=self.cfg.adapter_seed, trainable=False)
        try:
            state = lorakit.extract_state(self.model, ADAPTER)
        finally:
            lorakit.delete(self.model, ADAPTER)
        return state

    def _install(self, aggregator: Aggregator, download: Mapping[str, torch.Tensor], spec: AdapterSpec,
                 seed: int, trainable: bool) -> None:
        """Attach the round's starting adapter: fresh (seed) or the shared seed + the global tensors."""
        import lorakit
        from lorakit.core.inject import adapter_modules

        lorakit.attach(self.model, spec, ADAPTER, seed=seed, trainable=trainable)
        tensors = {k: v for k, v in download.items() if not _is_delta_key(k)}
        if not tensors:
            return
        forms = adapter_modules(self.model, ADAPTER)
        with torch.no_grad():
            for k, t in tensors.items():
                cls = type(next(iter(forms.values())))
                path, name = cls.split_key(k)
                if path not in forms or not hasattr(forms[path], name):
                    raise ValueError(f"downloaded tensor {k!r} has no place in the client's adapter")
                target = getattr(forms[path], name)
                if tuple(target.shape) != tuple(t.shape):
                    raise ValueError(f"downloaded tensor {k!r}: shape {tuple(t.shape)}, adapter has "
                                     f"{tuple(target.shape)}")
                target.copy_(t)

    # -- one client round ----------------------------------------------------------------------
    def train(self, aggregator: Aggregator, download: Mapping[str, torch.Tensor], client_id: int,
              server_round: int) -> ClientUpdate:
        """Local training of client ``client_id`` in round ``server_round`` (1-based) from ``download``."""
        import lorakit
        from lorakit.core.inject import mark_trainable

        cfg = self.cfg
        if (client_id, server_round) in cfg.failures():
            raise SimulatedFailure(f"client {client_id} fails in round {server_round} (fail={cfg.fail!r})")
        if not 0 <= client_id < cfg.clients:
            raise ValueError(f"client id {client_id} outside [0, {cfg.clients})")
        torch.set_num_threads(max(1, cfg.threads))
        t0 = time.perf_counter()
        seed = derive_seed("client", cfg.seed, server_round, client_id)
        spec = client_spec(cfg, client_id) if aggregator.heterogeneous_ranks else global_spec(cfg)
        examples = [self.task.train[i] for i in self.partitions[client_id]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.set_base(download)
            init_seed = seed if aggregator.fresh_adapters else cfg.adapter_seed
            self._install(aggregator, download, spec, init_seed, trainable=True)
            try:
                params = mark_trainable(self.model, ADAPTER)
                losses, eps = self._local_steps(params, examples, seed, server_round)
                state = lorakit.extract_state(self.model, ADAPTER)
            finally:
                lorakit.delete(self.model, ADAPTER)
                self.model.eval()
        cls = state.form_class()
        sent = set(aggregator.upload_names())
        tensors = {k: t for k, t in state.tensors.items() if cls.split_key(k)[1] in sent}
        upload = AdapterState(spec=state.spec, tensors=tensors, base={}, meta={})
        metrics = {"train_loss": float(sum(losses) / len(losses)) if losses else math.nan,
                   "train_seconds": time.perf_counter() - t0}
        if eps is not None:
            metrics["epsilon"] = eps
        return ClientUpdate(client_id=client_id, state=upload, num_examples=len(examples), metrics=metrics)

    def _loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task.kind == "classification":
            return self.objective.loss(model, batch)
        # LM: mean over rows of each row's mean token NLL (a per-sample loss, as DP-SGD needs)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = (labels != -100).float()
        return ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()

    def _local_steps(self, params: list[nn.Parameter], examples: list, seed: int,
                     server_round: int) -> tuple[list[float], float | None]:
        cfg = self.cfg
        n, bsz = len(examples), min(cfg.batch_size, len(examples))
        g = torch.Generator().manual_seed(seed)
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        collate = self.objective.collate
        losses: list[float] = []
        self.model.train()
        if not cfg.dp:
            for _ in range(cfg.local_steps):
                idx = torch.randperm(n, generator=g)[:bsz].tolist()
                loss = self._loss(self.model, collate([examples[i] for i in idx]))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"local loss is {loss.item()}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            return losses, None
        from lorakit.federated.dp import PrivateStep, dp_view, epsilon

        q = bsz / n
        noise_gen = torch.Generator().manual_seed(derive_seed("dp-noise", seed))
        with dp_view(self.model, ADAPTER) as model:
            private = PrivateStep(model, opt, noise_multiplier=cfg.dp_noise, max_grad_norm=cfg.dp_clip,
                                  expected_batch_size=bsz, generator=noise_gen)
            try:
                for _ in range(cfg.local_steps):
                    idx = (torch.rand(n, generator=g) < q).nonzero().flatten().tolist()  # Poisson sampling
                    if not idx:
                        private.empty_step()
                        continue
                    loss = self._loss(private.model, collate([examples[i] for i in idx]))
                    loss.backward()
                    private.step()
                    losses.append(float(loss.detach()))
            finally:
                private.close()
        # conservative: as if this client had taken part in every round so far
        return losses, epsilon(cfg.dp_noise, q, cfg.local_steps * server_round, cfg.dp_delta)

    # -- server-side evaluation ----------------------------------------------------------------
    def evaluate(self, aggregator: Aggregator, state: GlobalState) -> dict[str, float]:
        """Metrics of the global model (original base + merged delta + global adapter) on the eval split."""
        import lorakit

        self.set_base(state.base_delta)
        if state.adapter is not None:
            self._install(aggregator, state.adapter.tensors, state.adapter.spec, self.cfg.adapter_seed,
                          trainable=False)
        try:
            with torch.no_grad():
                return self.objective.evaluate(self.model.eval())
        finally:
            if state.adapter is not None:
                lorakit.delete(self.model, ADAPTER)
            self.set_base({})


def _is_delta_key(k: str) -> bool:
    return k.rpartition(".")[2] in ("delta_A", "delta_B", "delta_W")
