"""The Flower app: a ServerApp with a custom strategy that wraps lorakit's aggregators, and a
ClientApp that runs lorakit's local round. Needs ``pip install 'lorakit[federated]'`` (flwr).

The same two apps run in Flower's simulation engine (``simulate`` here, or ``flwr run`` against a
local simulation SuperLink) and in its deployment engine (a SuperLink and SuperNodes, possibly on
other machines; see docs/federated.md). ``server_app`` and ``client_app`` are the module-level
components a Flower app's pyproject.toml names (``write_app`` writes one); they read the run
config (``[tool.flwr.app.config]``, ``--run-config``) into a :class:`FedConfig`.

What travels (``ArrayRecord`` of torch tensors, ``ConfigRecord``/``MetricRecord`` of scalars):
server → client: the aggregator's download (global adapter minus seeded tensors, merged base delta)
and the round number; client → server: the uploaded tensors, the client's adapter spec (JSON),
``num-examples``, ``client-id`` (its partition id), and its metrics (train loss, ε under DP).

The strategy subclasses Flower's built-in averaging strategy for sampling and the round loop only;
``aggregate_train`` hands the replies to :class:`~lorakit.federated.server.Server` (validation,
rejection with a logged reason, aggregation, gap, traffic). Failed replies (a crashed or killed
client) are logged and the round goes on when ``min_clients`` valid updates remain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg as _FlowerStrategy  # Flower's class, not a lorakit method
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Flower integration needs Flower: pip install 'lorakit[federated]'") from e

from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.federated.base import ClientUpdate
from lorakit.federated.client import Runtime, make_aggregator
from lorakit.federated.config import FedConfig
from lorakit.federated.run import FedResult, eval_due, new_server, save_result
from lorakit.federated.server import Server

log = logging.getLogger("lorakit.federated")
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DEDUP_LOGS": "0"}


def _config(context: Context, overrides: dict[str, Any] | None) -> FedConfig:
    return FedConfig.from_mapping(dict(context.run_config), **(overrides or {}))


# -- strategy ------------------------------------------------------------------------------------
class LoRAStrategy(_FlowerStrategy):
    """Flower's round loop and sampling, lorakit's validation and aggregation."""

    def __init__(self, server: Server, cfg: FedConfig) -> None:
        super().__init__(fraction_train=cfg.fraction, fraction_evaluate=0.0, min_train_nodes=cfg.min_clients,
                         min_evaluate_nodes=0, min_available_nodes=cfg.min_clients)
        self.server, self.cfg = server, cfg
        self._sent = 0

    def summary(self) -> None:
        log.info("lorakit strategy: %s, %d clients, min %d valid updates per round", self.server.aggregator.describe(),
                 self.cfg.clients, self.cfg.min_clients)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, to_record(self.server.download()), config, grid))
        self._sent = len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[ClientUpdate] = []
        failures: dict[Any, str] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures[f"node {node}"] = f"error reply: {_short(msg.error.reason)}"
                continue
            try:
                updates.append(parse_reply(msg.content))
            except (KeyError, TypeError, ValueError) as e:
                failures[f"node {node}"] = f"malformed reply ({type(e).__name__}: {e})"
        missing = self._sent - len(updates) - len(failures)
        if missing > 0:
            failures["timeout"] = f"{missing} client(s) did not reply within {self.cfg.round_timeout:.0f} s"
        report = self.server.round(updates, sent=self._sent, failures=failures)
        metrics = {"accepted": len(report.accepted), "rejected": len(report.rejected), "failed": len(report.failed),
                   "total-bytes": int(report.traffic.get("total_bytes", 0))}
        if report.gap:
            metrics["gap"] = float(report.gap["relative"])
        for k in ("train_loss_mean", "epsilon_max"):
            if k in report.info:
                metrics[k.replace("_", "-")] = float(report.info[k])
        if report.skipped:
            return None, MetricRecord(metrics)
        return to_record(self.server.download()), MetricRecord(metrics)


def _short(reason: str, limit: int = 300) -> str:
    """The useful end of a (Ray) traceback: the last 'Message: ...', without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    if "running low on memory" in text:  # Ray's memory monitor killed the ClientApp's worker
        used = re.search(r"was ([\d.]+GB / [\d.]+GB)", text)
        return "Ray killed the ClientApp: the machine ran low on memory" + (f" ({used.group(1)} used)" if used else "")
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.split()).rstrip("'>")
    return text if len(text) <= limit else "..." + text[-limit:]


def to_record(tensors: dict[str, Any]) -> ArrayRecord:
    from collections import OrderedDict

    return ArrayRecord(torch_state_dict=OrderedDict((k, v.detach().cpu().contiguous()) for k, v in tensors.items()))


def parse_reply(content: RecordDict) -> ClientUpdate:
    """A ClientUpdate from a ClientApp's reply (raises KeyError/TypeError/ValueError when malformed)."""
    metrics = content["metrics"]
    spec = AdapterSpec.from_dict(json.loads(str(content["config"]["spec"])))
    tensors = dict(content["arrays"].to_torch_state_dict())
    n = metrics["num-examples"]
    extra = {k: float(v) for k, v in metrics.items() if k not in ("num-examples", "client-id")
             and isinstance(v, (int, float))}
    return ClientUpdate(client_id=int(metrics["client-id"]), state=AdapterState(spec=spec, tensors=tensors),
                        num_examples=int(n) if float(n).is_integer() else n, metrics=extra)


def reply_content(update: ClientUpdate) -> RecordDict:
    metrics: dict[str, Any] = {"num-examples": int(update.num_examples), "client-id": int(update.client_id)}
    metrics.update({k: float(v) for k, v in update.metrics.items()})
    return RecordDict({"arrays": to_record(update.state.tensors), "metrics": MetricRecord(metrics),
                       "config": ConfigRecord({"spec": json.dumps(update.state.spec.to_dict())})})


# -- the apps ------------------------------------------------------------------------------------
def wait_for_nodes(grid: Grid, n: int, timeout: float) -> int:
    """Wait until ``n`` SuperNodes are connected (the ServerApp may start first); returns how many are."""
    deadline = time.monotonic() + timeout
    while (found := len(list(grid.get_node_ids()))) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def serve(grid: Grid, cfg: FedConfig, engine: str = "flower") -> FedResult:
    """The ServerApp's work: all rounds through the strategy, central evaluation, result files."""
    t0 = time.perf_counter()
    rt = Runtime.shared(cfg)
    server = new_server(cfg, rt)
    found = wait_for_nodes(grid, cfg.clients, cfg.round_timeout)
    if found < cfg.clients:
        log.warning("only %d of %d SuperNodes connected after %.0f s; starting anyway", found, cfg.clients,
                    cfg.round_timeout)
    evals: dict[int, dict[str, float]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round != 0 and not eval_due(cfg, server_round):
            return None
        metrics = rt.evaluate(server.aggregator, server.state)
        evals[server_round] = metrics
        if server_round > 0 and server.reports:
            server.reports[-1].eval = metrics
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    LoRAStrategy(server, cfg).start(grid=grid, initial_arrays=to_record(server.download()), num_rounds=cfg.rounds,
                                    timeout=cfg.round_timeout, evaluate_fn=evaluate_fn)
    result = FedResult(config=cfg, engine=engine, state=server.state, reports=server.reports, evals=evals,
                       seconds=time.perf_counter() - t0, metric_name=rt.objective.metric_name)
    save_result(result, cfg.out)
    return result


def make_server_app(overrides: dict[str, Any] | None = None, results: list[FedResult] | None = None,
                    engine: str = "flower") -> ServerApp:
    """A ServerApp; ``overrides`` win over the run config, ``results`` receives the FedResult."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = serve(grid, _config(context, overrides), engine=engine)
        if results is not None:
            results.append(result)

    return app


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp: client ``partition-id`` (node config) trains one local round per message."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = _config(context, overrides)
        node_config = context.node_config
        if "partition-id" not in node_config:
            raise ValueError("this SuperNode has no partition-id; start it with "
                             "--node-config 'partition-id=K num-partitions=N'")
        pid = int(node_config["partition-id"])
        parts = int(node_config.get("num-partitions", cfg.clients))
        if parts != cfg.clients:
            raise ValueError(f"SuperNode says num-partitions={parts} but the run has clients={cfg.clients}")
        server_round = int(msg.content["config"]["server-round"])
        download = dict(msg.content["arrays"].to_torch_state_dict())
        update = Runtime.shared(cfg).train(make_aggregator(cfg), download, pid, server_round)
        return Message(reply_content(update), reply_to=msg)

    return app


server_app = make_server_app()
client_app = make_client_app()


# -- engines -------------------------------------------------------------------------------------
def simulate(cfg: FedConfig, *, num_cpus: int | None = None, verbose: bool = False) -> FedResult:
    """Run ``cfg`` in Flower's simulation engine (Ray) in this process tree: one virtual SuperNode per
    client, one CPU per ClientApp actor."""
    from flwr.simulation import run_simulation

    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    overrides = cfg.to_dict()
    results: list[FedResult] = []
    cpus = num_cpus or os.cpu_count() or 1
    run_simulation(server_app=make_server_app(overrides, results, engine="flower-simulation"),
                   client_app=make_client_app(overrides),
                   num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}},
                   verbose_logging=verbose)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result; see the log above")
    return results[0]


APP_PYPROJECT = """\
# A Flower app running lorakit's federated LoRA (written by `lorakit fed app`).
# lorakit[federated] must be installed wherever the SuperLink and the SuperNodes run: the app ships
# no code of its own and declares no dependencies (so that the SuperLink's runtime dependency
# installation never pulls torch).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lorakit-fed"
version = "1.0.0"
description = "Federated LoRA with lorakit"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lorakit"

[tool.flwr.app.components]
serverapp = "lorakit.federated.flower:server_app"
clientapp = "lorakit.federated.flower:client_app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app(directory: str | Path, cfg: FedConfig) -> Path:
    """Write a Flower app folder (pyproject.toml + README) whose run config is ``cfg``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in cfg.to_run_config().items())
    (d / "pyproject.toml").write_text(APP_PYPROJECT.format(config=lines))
    (d / "README.md").write_text("lorakit federated LoRA as a Flower app; see lorakit's docs/federated.md.\n")
    return d
