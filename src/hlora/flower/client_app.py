"""The ClientApp: one SuperNode's side of a round, through the same `FederatedClient` as the simulation.

A node holds one partition of the run's data, named by its node config (`flower-supernode
--node-config "partition-id=0 num-partitions=3"`, optionally `data-dir="/path/to/glue"`). It answers
two messages:

- `query`: which partition it holds, so that the server can map its client ids to node ids;
- `train`: a plan (`hlora.flower.wire`) and the run's resolved config. The node prepares the run as the
  simulation does (same data, same partition, same seeded model and round-0 adapter), rebuilds from the
  seed what the plan says does not travel, trains its partition with the round's seed and sends back
  what the plan says travels up.

Flower 1.42's SuperNode starts one ClientApp process per message, so the base model is loaded once per
process, which is once per round; a process that serves several messages (another isolation mode)
loads it once. What a node must remember between rounds (FLoRA's base deltas, folded into its base
weights) lives in the node's `context.state`, which the SuperNode keeps for the run.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hlora.client.client import FederatedClient
from hlora.client.trainer import LocalTrainer
from hlora.config import Settings, settings_to_toml, validate_settings
from hlora.federation.simulation import Experiment, prepare
from hlora.flower.wire import NODE_RECORD, RUN_CONFIG, decode_plan, encode_update, from_record, to_record
from hlora.weights import AdapterWeights

log = logging.getLogger("hlora.flower")

_DELTA = "hlora.delta."  # context.state keys of the base deltas this node has folded in

app = ClientApp()


@dataclass
class _Prepared:
    exp: Experiment
    round0: AdapterWeights  # the run's round-0 global adapter, rebuilt from the seed


_prepared: dict[str, _Prepared] = {}  # by the config it was prepared from: one per run in a process


def node_partition(node_config: dict[str, Any]) -> tuple[int, int]:
    """`(partition-id, num-partitions)` from a node config; ValueError where they are missing or wrong."""
    try:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            'this SuperNode has no partition: start it with --node-config "partition-id=K num-partitions=N"'
        ) from None
    if not 0 <= pid < num:
        raise ValueError(f"partition-id {pid} is outside 0..{num - 1}")
    return pid, num


def node_settings(config_toml: str, node_config: dict[str, Any]) -> Settings:
    """The run's config as the server resolved it, with this node's own `data-dir` if it names one."""
    raw = tomllib.loads(config_toml)
    if node_config.get("data-dir"):
        raw.setdefault("data", {})["data_dir"] = str(node_config["data-dir"])
    return validate_settings(raw)


def _prepare(settings: Settings) -> _Prepared:
    key = settings_to_toml(settings)
    if key not in _prepared:
        exp = prepare(settings)
        # Before any round: the server's global adapter is still the round-0 one.
        _prepared.clear()
        _prepared[key] = _Prepared(exp, exp.server.global_weights)
    return _prepared[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds."""
    pid, num = node_partition(context.node_config)
    return Message(
        RecordDict({NODE_RECORD: ConfigRecord({"partition-id": pid, "num-partitions": num})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition as the plan says; reply with the update. Raises (so Flower replies
    with an error) where the message is not a plan for this node."""
    pid, _ = node_partition(context.node_config)
    settings = node_settings(str(msg.content.config_records[RUN_CONFIG]["toml"]), context.node_config)
    prepared = _prepare(settings)
    exp = prepared.exp
    plan, header = decode_plan(msg.content, prepared.round0)
    if header["client-id"] != pid:
        raise ValueError(f"a plan for client {header['client-id']} reached the node of partition {pid}")
    # Deltas folded in earlier rounds (this process's model is fresh, or holds them already: merge skips
    # those it holds), then the plan's own, which fit() folds in.
    held = _held_deltas(context)
    for version in sorted(held):
        exp.model.merge(version, AdapterWeights.from_tensors(from_record(held[version])))
    trainer = LocalTrainer(exp.model, settings.train, exp.collate, progress=False)
    client = FederatedClient(pid, exp.train.subset(exp.partitions[pid]), trainer)
    _, result = client.fit(plan, header["seed"])
    for delta in plan.merge:
        context.state[f"{_DELTA}{delta.version}"] = to_record(delta.weights.tensors())
    log.info(
        "round %d: client %d trained at rank %d, loss %.4f", header["round"], pid, plan.adapter.rank,
        result.mean_loss,
    )
    return Message(encode_update(plan, result), reply_to=msg)


def _held_deltas(context: Context) -> dict[int, ArrayRecord]:
    return {
        int(key.removeprefix(_DELTA)): record
        for key, record in context.state.array_records.items()
        if key.startswith(_DELTA)
    }
