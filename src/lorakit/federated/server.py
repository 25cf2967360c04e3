"""The server side of a round, shared by the plain loop and the Flower strategy.

:class:`Server` holds the global state, validates each update (a rejected update is logged with its
reason and never aggregated), aggregates the valid ones when at least ``min_clients`` remain (else
the round keeps the previous global model), and records the round: who was accepted, rejected or
failed, the aggregation gap, the bytes each way, the aggregator's diagnostics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.core.state import AdapterState
from lorakit.federated.base import Aggregator, ClientUpdate, GlobalState
from lorakit.federated.metrics import aggregation_gap, traffic
from lorakit.federated.validate import args_mismatch, validate_update

log = logging.getLogger("lorakit.federated")


@dataclass
class RoundReport:
    round: int
    sent: int  # clients asked to train
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason
    failed: dict[int, str] = field(default_factory=dict)  # client -> error (dropout, crash)
    skipped: bool = False  # too few valid updates: the global model did not change
    gap: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Server:
    def __init__(self, aggregator: Aggregator, template: AdapterState, *, min_clients: int = 1,
                 max_rank: int | None = None) -> None:
        self.aggregator = aggregator
        self.template = template
        self.min_clients = max(1, min_clients)
        self.max_rank = max_rank
        self.state: GlobalState = aggregator.init_state(template)
        self.reports: list[RoundReport] = []

    def download(self) -> dict[str, torch.Tensor]:
        return self.aggregator.download(self.state)

    def check(self, update: ClientUpdate) -> str | None:
        """The reason to reject ``update``, or None."""
        agg = self.aggregator
        reason = validate_update(update, self.template, agg.upload_names(),
                                 expected_shapes=agg.expected_shapes(self.state, self.template),
                                 max_rank=self.max_rank)
        if reason is None and not agg.heterogeneous_ranks:
            # compare the built Args, not the raw dicts: {'r': 4, 'alpha': 8} and the same with the
            # defaults spelled out are one adapter
            reason = args_mismatch(update.state.spec, self.template)
        return reason

    def round(self, updates: Sequence[ClientUpdate], *, sent: int | None = None,
              failures: dict[int, str] | None = None) -> RoundReport:
        """Validate, aggregate and record one round; returns its report (also kept in ``reports``)."""
        rnd = self.state.round + 1
        download = self.download()
        report = RoundReport(round=rnd, sent=sent if sent is not None else len(updates) + len(failures or {}),
                             failed=dict(failures or {}))
        for cid, why in report.failed.items():
            log.warning("round %d: client %s failed: %s", rnd, cid, why)
        valid: list[ClientUpdate] = []
        seen: set[int] = set()
        for u in updates:
            reason = "duplicate update for this client in this round" if u.client_id in seen else self.check(u)
            if reason is not None:
                report.rejected[u.client_id] = reason
                log.warning("round %d: rejected update from client %s: %s", rnd, u.client_id, reason)
                continue
            seen.add(u.client_id)
            valid.append(u)
            report.client_metrics[u.client_id] = dict(u.metrics)
        report.traffic = traffic(download, [u.state.tensors for u in updates], report.sent)
        if len(valid) < self.min_clients:
            report.skipped = True
            log.warning("round %d: only %d valid update(s), fewer than min_clients=%d; the global model is "
                        "unchanged", rnd, len(valid), self.min_clients)
            self.state.round = rnd
            self.reports.append(report)
            return report
        before = self.state
        result = self.aggregator.aggregate(before, valid)
        report.accepted = sorted(u.client_id for u in valid)
        completed = [self.aggregator.complete(u.state, before) for u in sorted(valid, key=lambda u: u.client_id)]
        report.gap = aggregation_gap(before, result.state, completed, result.info["weights"])
        report.info = {k: v for k, v in result.info.items() if k not in ("clients",)}
        eps = [m["epsilon"] for m in report.client_metrics.values() if "epsilon" in m]
        if eps:
            report.info["epsilon_max"] = max(eps)
        losses = [m["train_loss"] for m in report.client_metrics.values()
                  if "train_loss" in m and not math.isnan(m["train_loss"])]
        if losses:
            report.info["train_loss_mean"] = sum(losses) / len(losses)
        self.state = result.state
        self.reports.append(report)
        log.info("round %d: %d accepted, %d rejected, %d failed; gap %.3e", rnd, len(valid), len(report.rejected),
                 len(report.failed), report.gap["relative"])
        return report
