"""The Flower apps in one process: the ServerApp's `main` over a grid whose nodes are the ClientApp
called directly, so the strategy, the wire format and the node's training are tested without a
SuperLink (tests/test_flower.py runs the real thing). Nodes can stay silent, reply with an error, or
reply with what does not decode."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from hlora import simulation
from hlora.aggregation import registry
from hlora.config import settings_to_toml, validate_settings
from hlora.federation.prepared import prepare
from hlora.flower import client_app, node_config, server_app
from hlora.flower.server_app import NodeError
from hlora.flower.wire import UPDATE_ARRAYS, UPDATE_METRICS
from hlora.rundir import create_run_dir, read_metrics

# A node's behaviour: given the message and what the ClientApp would reply, the reply to deliver
# (None: the node stays silent).
Behaviour = Callable[[Message, Callable[[], Message]], Message | None]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's app runners set in a ServerApp's or ClientApp's process before a Message is made."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)

# every method that serves mixed ranks: a new one is checked against the simulation without a line here
MIXED_RANK_METHODS = [m for m in registry.ordered() if not registry.get(m).equal_ranks]


def honest(msg: Message, reply: Callable[[], Message]) -> Message | None:
    return reply()


class LoopbackGrid(Grid):
    """A grid whose nodes are the ClientApp, each with its own node config and state, in this process."""

    def __init__(self, node_configs: dict[int, dict], behaviour: dict[int, Behaviour] | None = None) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
            for node, cfg in node_configs.items()
        }
        self.behaviour = behaviour or {}
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not called by the apps
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids do when they push
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            behaviour = self.behaviour.get(node, honest)
            reply = behaviour(msg, lambda m=msg, n=node: client_app.app(m, self.contexts[n]))
            if reply is not None:
                replies.append(reply)
        return replies


def node_configs(n: int = 3) -> dict[int, dict]:
    # Node ids unlike the partition ids, in another order: the server must map them.
    return {1000 + 7 * (n - k): {"partition-id": k, "num-partitions": n} for k in range(n)}


def node_of(grid: LoopbackGrid, partition: int) -> int:
    return next(node for node, c in grid.contexts.items() if c.node_config["partition-id"] == partition)


def mixed(settings, **federation):
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"].update({"method": "hlora", **federation})
    return validate_settings(raw)


def run_server(grid: Grid, settings, tmp_path: Path, **run_config) -> Path:
    config = tmp_path / "hlora.toml"
    config.write_text(settings_to_toml(settings), encoding="utf-8")
    out = tmp_path / "flower-run"
    cfg = {"config": str(config), "out": str(out), "reply-timeout": 5.0, "node-timeout": 5.0, **run_config}
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return out


@pytest.mark.parametrize("method", MIXED_RANK_METHODS)
def test_the_apps_in_one_process_give_the_simulations_run(tiny_settings, tmp_path, method):
    settings = mixed(tiny_settings, method=method)
    out = run_server(LoopbackGrid(node_configs()), settings, tmp_path)
    sim = tmp_path / "sim"
    simulation.run(prepare(settings), create_run_dir(sim), progress=False)
    a = load_file(out / "checkpoint/adapter.safetensors")
    b = load_file(sim / "checkpoint/adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for got, want in zip(read_metrics(out), read_metrics(sim), strict=True):
        for key in ("accuracy", "train_loss", "uplink_bytes", "downlink_bytes", "client_uplink_bytes",
                    "client_downlink_bytes", "aggregated_clients", "failed_clients", "rejected",
                    "invalid_reports"):
            assert got[key] == want[key], key
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_the_apps_skip_the_rounds_eval_every_skips_as_the_simulation_does(tiny_settings, tmp_path):
    raw = mixed(tiny_settings, rounds=3).model_dump()
    raw["eval"]["every"] = 2
    settings = validate_settings(raw)
    out = run_server(LoopbackGrid(node_configs()), settings, tmp_path)
    sim = tmp_path / "sim"
    simulation.run(prepare(settings), create_run_dir(sim), progress=False)
    got, want = read_metrics(out), read_metrics(sim)
    assert [r["evaluated"] for r in got] == [r["evaluated"] for r in want] == [False, True, True]
    assert ["accuracy" in r for r in got] == [False, True, True]
    assert [r.get("accuracy") for r in got] == [r.get("accuracy") for r in want]
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]


def test_lost_and_unreadable_replies_are_recorded_and_the_round_aggregates_the_rest(tiny_settings, tmp_path):
    grid = LoopbackGrid(node_configs())

    def silent_in_round_2(msg, reply):
        return None if msg.metadata.group_id == "2" else reply()

    def raises_in_round_2(msg, reply):
        if msg.metadata.group_id == "2":
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=msg)
        return reply()

    grid.behaviour = {node_of(grid, 1): raises_in_round_2, node_of(grid, 2): silent_in_round_2}
    rows = read_metrics(run_server(grid, mixed(tiny_settings), tmp_path))
    assert rows[0]["failed_clients"] == {} and rows[0]["aggregated_clients"] == [0, 1, 2]
    assert rows[1]["failed_clients"] == {"1": "crash", "2": "timeout"}
    assert rows[1]["aggregated_clients"] == [0] and not rows[1]["round_failed"]
    assert set(rows[1]["client_uplink_bytes"]) == {"0"}


def test_a_reply_that_does_not_decode_is_a_rejection_and_below_min_clients_the_round_fails(
    tiny_settings, tmp_path
):
    grid = LoopbackGrid(node_configs())

    def garbled(msg, reply):
        answer = reply()
        if msg.metadata.message_type == "train":
            arrays = answer.content.array_records[UPDATE_ARRAYS]
            del arrays[next(k for k in arrays if k.endswith(".lora_A"))]  # a B without its A
        return answer

    grid.behaviour = {node_of(grid, 0): garbled}
    rows = read_metrics(run_server(grid, mixed(tiny_settings, min_clients=3), tmp_path))
    for row in rows:
        assert row["rejected"] == {"0": "malformed"}
        assert row["round_failed"] and row["aggregated_clients"] == []


def test_nodes_that_do_not_cover_the_partitions_are_refused(tiny_settings, tmp_path):
    two = {1: {"partition-id": 0, "num-partitions": 3}, 2: {"partition-id": 0, "num-partitions": 3}}
    with pytest.raises(NodeError, match="node 2: partition 0 is held by node 1"):
        run_server(LoopbackGrid(two), mixed(tiny_settings), tmp_path, **{"node-timeout": 0.0})
    other = {1: {"partition-id": 0, "num-partitions": 4}}
    with pytest.raises(NodeError, match="num_clients = 3"):
        run_server(LoopbackGrid(other), mixed(tiny_settings), tmp_path, **{"node-timeout": 0.0})
    missing = {1: {"partition-id": 0, "num-partitions": 3}}
    with pytest.raises(NodeError, match=r"no node holds partition\(s\) \[1, 2\]"):
        run_server(LoopbackGrid(missing), mixed(tiny_settings), tmp_path, **{"node-timeout": 0.0})
    assert not (tmp_path / "flower-run").exists()  # a run that cannot start writes nothing


def test_a_resumed_flower_run_ends_as_the_run_that_never_stopped(tiny_settings, tmp_path):
    """FLoRA, whose nodes must hold every base delta: the resumed run is a new Flower run, whose nodes
    start with empty state (a new grid here), so the server sends them every delta again (without
    that, round 3's nodes would lack round 1's delta and fail)."""
    settings = mixed(tiny_settings, method="flora", rounds=3)
    whole = tmp_path / "whole"
    simulation.run(prepare(settings), create_run_dir(whole), progress=False)
    out = run_server(LoopbackGrid(node_configs()), mixed(tiny_settings, method="flora"), tmp_path)
    assert len(read_metrics(out)) == 2
    run_server(LoopbackGrid(node_configs()), settings, tmp_path, resume=True, set="federation.rounds=3")
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["aggregated_clients"] == [0, 1, 2] and rows[2]["failed_clients"] == {}
    for name in ("adapter.safetensors", "aggregator.safetensors"):
        a, b = load_file(out / "checkpoint" / name), load_file(whole / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert rows[2]["downlink_bytes"] > read_metrics(whole)[2]["downlink_bytes"]  # round 1's delta again


def test_a_restarted_node_takes_its_partition_back_and_is_sent_everything(tiny_settings, tmp_path):
    """After round 2 the node of partition 2 goes and comes back under a new id with empty state (a
    SuperNode restarted): round 3 asks the new node its partition and sends it FLoRA's every delta."""
    grid = LoopbackGrid(node_configs())
    old = node_of(grid, 2)

    def restarts_after_round_2(msg, reply):
        answer = reply()
        if msg.metadata.group_id == "2":
            config = grid.contexts.pop(old).node_config
            grid.contexts[4242] = Context(run_id=1, node_id=4242, node_config=config, state=RecordDict(),
                                          run_config={})
        return answer

    grid.behaviour = {old: restarts_after_round_2}
    rows = read_metrics(run_server(grid, mixed(tiny_settings, method="flora", rounds=3), tmp_path))
    assert [r["aggregated_clients"] for r in rows] == [[0, 1, 2]] * 3
    assert all(r["failed_clients"] == {} for r in rows)
    to_new = [m for m in grid.sent if m.metadata.dst_node_id == 4242 and m.metadata.message_type == "train"]
    assert [list(m.content.config_records["hlora.plan"]["merge"]) for m in to_new] == [[1, 2]]


def claims(pid: object, num: object) -> Behaviour:
    """A node that answers the partition query with its own claim, whatever its node config says (a
    node that does not run hlora's ClientApp)."""

    def behaviour(msg: Message, reply: Callable[[], Message]) -> Message | None:
        if msg.metadata.message_type != "query":
            return reply()
        record = ConfigRecord({"partition-id": pid, "num-partitions": num})
        return Message(RecordDict({node_config.NODE_RECORD: record}), reply_to=msg)

    return behaviour


@pytest.mark.parametrize("pid", [7, -1, 3, "0", 0.5, True, "x" * 10_000])
def test_a_claimed_partition_outside_the_run_is_ignored_and_does_not_complete_the_count(pid, caplog):
    """Nodes of partitions 0 and 1, and a third node that claims partition `pid` of 3: the count of
    three nodes is not complete, partition 2 is still missing."""
    grid = LoopbackGrid({**node_configs(2), 99: {}})
    for node in list(grid.contexts)[:2]:
        grid.contexts[node].node_config["num-partitions"] = 3
    grid.behaviour = {99: claims(pid, 3)}
    with pytest.raises(NodeError, match=r"no node holds partition\(s\) \[2\]") as e:
        server_app.find_nodes(grid, 3, timeout=0.0)
    assert "node 99" in str(e.value) and len(str(e.value)) < 200  # which node was ignored and why, briefly
    assert "node 99" in caplog.text


def test_a_second_claim_of_a_partition_is_refused_and_the_first_node_keeps_it(caplog):
    grid = LoopbackGrid(node_configs(3))
    first = node_of(grid, 1)
    grid.contexts[5] = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    grid.behaviour = {5: claims(1, 3)}
    found = server_app.find_nodes(grid, 3, timeout=0.0)
    assert found == {k: node_of(grid, k) for k in range(3)} and found[1] == first
    assert "node 5" in caplog.text and "partition 1" in caplog.text


def test_a_run_goes_on_past_nodes_with_false_claims(tiny_settings, tmp_path):
    """Beside the three honest nodes: one claims partition 7 of 3, one a partition another node holds,
    one another run's count. None of them stops the run or is sent a plan."""
    grid = LoopbackGrid(node_configs())
    for node, claim in ((11, claims(7, 3)), (12, claims(0, 3)), (13, claims(0, 4))):
        grid.contexts[node] = Context(
            run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
        )
        grid.behaviour[node] = claim
    rows = read_metrics(run_server(grid, mixed(tiny_settings), tmp_path))
    assert [r["aggregated_clients"] for r in rows] == [[0, 1, 2]] * 2
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {node_of(grid, k) for k in range(3)}


def test_figures_a_node_reports_out_of_bounds_are_recorded_as_missing_not_averaged(tiny_settings, tmp_path):
    """A node replies with a NaN loss, a 2^62-byte peak and a NaN where a count belongs: its update
    still counts (it is judged on its own), its figures are named in `invalid_reports` and reach
    neither the loss, nor the tier's peak, nor the summary's maximum."""
    grid = LoopbackGrid(node_configs())

    def boasts(msg, reply):
        answer = reply()
        if msg.metadata.message_type == "train":
            figures = answer.content.metric_records[UPDATE_METRICS]
            figures["mean-loss"], figures["peak-bytes"], figures["state-bytes"] = math.nan, 2**62, math.nan
        return answer

    grid.behaviour = {node_of(grid, 0): boasts}
    out = run_server(grid, mixed(tiny_settings), tmp_path)
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in text and str(2**62) not in text
    for row in read_metrics(out):
        assert row["invalid_reports"] == {"0": ["mean_loss", "peak_bytes", "state_bytes"]}
        assert row["aggregated_clients"] == [0, 1, 2] and row["rejected"] == {}
        assert math.isfinite(row["train_loss"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["invalid_reports_by_field"] == {"mean_loss": 2, "peak_bytes": 2, "state_bytes": 2}
    assert all(v < 2**50 for v in summary["max_tier_peak_bytes"].values())
