"""The Flower app: the strategy wraps lorakit's server; a Flower simulation equals the plain loop bit
for bit; a client that fails or is killed mid-round does not stop the round; a real SuperLink and
SuperNodes on localhost run the app (deployment engine)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fed_helpers import client_states, make_csv, make_tiny_dir, template, updates_of

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict  # noqa: E402

from lorakit.federated import FedAvg, FedConfig, Server  # noqa: E402
from lorakit.federated.flower import LoRAStrategy, parse_reply, reply_content, write_app  # noqa: E402
from lorakit.federated.run import adapters_equal, run_local  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("flwr")
    return make_tiny_dir(d / "model"), make_csv(d / "data.csv")


def tiny_cfg(tiny, out, **kw):
    model, data = tiny
    base = dict(model=str(model), data=str(data), clients=3, rounds=2, local_steps=2, batch_size=4, rank=2,
                alpha=4.0, lr=1e-2, n_eval=15, max_length=32, min_client_examples=4, min_clients=2,
                out=str(out))
    base.update(kw)
    if base.get("method") == "lora_fair":  # a short server-side solve keeps the test fast
        base.setdefault("method_args", {"steps": 20})
    return FedConfig(**base)


def _reply_to(content=None, error=None, node=7):
    """A reply as the grid hands it to the strategy (metadata set as the SuperLink would)."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content, metadata=meta) if error is None else Message(error, metadata=meta)


def test_strategy_hands_replies_to_the_lorakit_server():
    """aggregate_train == Server.round on the same updates; error and malformed replies are failures."""
    tmpl = template()
    states = client_states(3)
    ups = updates_of(states)
    direct = Server(FedAvg(), tmpl, min_clients=2)
    direct.round(ups)
    cfg = FedConfig(clients=3, min_clients=2, method="fedavg")
    strategy = LoRAStrategy(Server(FedAvg(), tmpl, min_clients=2), cfg)
    strategy._sent = 5
    replies = [_reply_to(reply_content(u), node=10 + k) for k, u in enumerate(ups)]
    replies.append(_reply_to(error=Error(code=1, reason="client crashed"), node=20))
    replies.append(_reply_to(RecordDict({"config": ConfigRecord({"spec": "{}"})}), node=21))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert adapters_equal(strategy.server.state, direct.state)
    assert set(arrays.to_torch_state_dict()) == set(direct.download())
    report = strategy.server.reports[-1]
    assert report.accepted == [0, 1, 2] and len(report.failed) == 2
    assert any("client crashed" in why for why in report.failed.values())
    assert any("malformed reply" in why for why in report.failed.values())
    assert metrics["accepted"] == 3 and metrics["failed"] == 2


def test_reply_round_trip_keeps_tensors_spec_and_metrics():
    u = updates_of(client_states(1))[0]
    u.metrics = {"train_loss": 1.5, "epsilon": 2.0}
    back = parse_reply(reply_content(u))
    assert back.client_id == u.client_id and back.num_examples == u.num_examples
    assert back.state.spec == u.state.spec and back.metrics == u.metrics
    assert all(torch.equal(back.state.tensors[k], v) for k, v in u.state.tensors.items())


def test_written_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    d = write_app(tmp_path / "app", FedConfig(method="flora", rounds=4, dp=True))
    config, warnings = load_and_validate(d / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "lorakit.federated.flower:client_app"
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert FedConfig.from_mapping(run_config) == FedConfig(method="flora", rounds=4, dp=True)


def test_written_app_carries_method_args_as_a_toml_table(tmp_path):
    """method_args travel as ``method-args.<field>`` keys: a TOML table in the app, dotted keys in
    Flower's flattened run config; both read back to the same config and aggregator Args."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    from lorakit.federated import LoRAFAIR
    from lorakit.federated.client import make_aggregator

    cfg = FedConfig(method="lora_fair", method_args={"steps": 7, "solver": "l2"})
    d = write_app(tmp_path / "app", cfg)
    text = (d / "pyproject.toml").read_text()
    assert "method-args.steps = 7" in text and 'method-args.solver = "l2"' in text and "fair" not in text.replace(
        'method = "lora_fair"', "")
    config, _ = load_and_validate(d / "pyproject.toml")
    table = config["tool"]["flwr"]["app"]["config"]
    assert table["method-args"] == {"steps": 7, "solver": "l2"}
    for run_config in (table, flatten_dict(table)):
        again = FedConfig.from_mapping(run_config)
        assert again == cfg and make_aggregator(again).args == LoRAFAIR.Args(steps=7, solver="l2")


# -- processes (slow) ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method,fail", [("fedavg", ""), ("flora", "1@2"), ("lora_fair", "")])
def test_flower_simulation_equals_the_plain_loop(tiny, tmp_path, method, fail):
    from lorakit.federated.flower import simulate

    cfg = tiny_cfg(tiny, tmp_path / "sim", method=method, fail=fail, ranks="1,2" if method == "flora" else "")
    sim = simulate(cfg, num_cpus=2)
    local = run_local(dataclasses.replace(cfg, out=str(tmp_path / "local")), progress=False)
    assert adapters_equal(sim.state, local.state)  # same global adapter / merged base, bit for bit
    assert sim.evals == local.evals
    if fail:  # the simulated failure: one error reply, the round still aggregated the other two
        r2 = sim.reports[1]
        assert r2.accepted == [0, 2] and not r2.skipped and len(r2.failed) == 1
        assert "fails in round 2" in next(iter(r2.failed.values()))
    summary = json.loads((tmp_path / "sim" / "fed_summary.json").read_text())
    assert summary["engine"] == "flower-simulation" and len(summary["rounds"]) == 2
    assert summary["method_args"] == local.summary()["method_args"]  # the ServerApp built the same Args
    if method == "lora_fair":
        assert summary["method_args"]["steps"] == 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_engine_on_localhost_survives_a_killed_supernode(tiny, tmp_path):
    """docs/federated.md's recipe: a SuperLink, 3 SuperNodes (separate processes) and `flwr run`; the
    SuperNode of client 1 is killed when round 2 starts, and round 2 still aggregates clients 0 and 2."""
    cfg = tiny_cfg(tiny, tmp_path / "out", round_timeout=90.0)
    app = write_app(tmp_path / "app", cfg)
    home = tmp_path / "flwr_home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs: list[subprocess.Popen] = []

    def start(*cmd, log):
        with open(tmp_path / log, "w") as f:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, cwd=tmp_path, start_new_session=True,
                                 stdout=f, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
              "--disable-runtime-dependency-installation", log="superlink.log")
        nodes = [start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                       "--port", str(_free_port()), "--node-config", f"partition-id={k} num-partitions=3",
                       log=f"supernode{k}.log") for k in range(3)]
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "deploy", "--stream"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(run)
        lines, killed = [], False
        deadline = time.monotonic() + 900
        for line in run.stdout:
            lines.append(line)
            if not killed and "[ROUND 2/" in line:
                os.killpg(nodes[1].pid, signal.SIGKILL)  # client 1's SuperNode and its ClientApp process
                killed = True
            if time.monotonic() > deadline:
                break
        run.wait(timeout=60)
        log = "".join(lines)
        assert run.returncode == 0, log[-3000:]
        assert killed, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    summary = json.loads((tmp_path / "out" / "fed_summary.json").read_text())
    assert summary["engine"] == "flower" and len(summary["rounds"]) == 2
    r1, r2 = summary["rounds"]
    assert r1["accepted"] == [0, 1, 2]
    assert r2["accepted"] == [0, 2] and not r2["skipped"] and r2["failed"]
    assert summary["metric_by_round"]["2"] is not None
