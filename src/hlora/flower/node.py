"""What a SuperNode does with a train message: prepare the run as the simulation does (same data, same
partition, same seeded model and round-0 adapter), rebuild from the seed what the plan says does not
travel, train the node's partition through `FederatedClient` with the round's seed, and reply with what
the plan says travels up.

The base model is loaded once per process. Flower 1.42's SuperNode starts one ClientApp process per
message, so that is once per round; what the node must remember between rounds (FLoRA's base deltas,
folded into its base weights) lives in the node's `context.state`, which the SuperNode keeps for the run.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Context, Message

from hlora.client.client import FederatedClient
from hlora.client.trainer import LocalTrainer
from hlora.config import Settings, settings_to_toml, validate_settings
from hlora.federation.prepared import PreparedRun, prepare
from hlora.flower.node_config import node_partition
from hlora.flower.wire import RUN_CONFIG, decode_plan, encode_update, from_record, to_record
from hlora.weights import AdapterWeights

log = logging.getLogger("hlora.flower")

_DELTA = "hlora.delta."  # context.state keys of the base deltas this node has folded in


@dataclass
class _Prepared:
    exp: PreparedRun
    round0: AdapterWeights  # the run's round-0 global adapter, rebuilt from the seed


_prepared: dict[str, _Prepared] = {}  # by the config it was prepared from: one run per process


def node_settings(config_toml: str, node_config: dict[str, Any]) -> Settings:
    """The run's config as the server resolved it, with this node's own `data-dir` if it names one."""
    raw = tomllib.loads(config_toml)
    if node_config.get("data-dir"):
        raw.setdefault("data", {})["data_dir"] = str(node_config["data-dir"])
    return validate_settings(raw)


def prepared(settings: Settings) -> _Prepared:
    key = settings_to_toml(settings)
    if key not in _prepared:
        exp = prepare(settings)
        _prepared.clear()
        # Before any round: the global adapter of this process's server is the round-0 one.
        _prepared[key] = _Prepared(exp, exp.server.global_weights)
    return _prepared[key]


def train(msg: Message, context: Context) -> Message:
    """The reply to a train message. Raises (so Flower replies with an error) where the message is not
    a plan for this node."""
    pid, _ = node_partition(context.node_config)
    settings = node_settings(str(msg.content.config_records[RUN_CONFIG]["toml"]), context.node_config)
    run = prepared(settings)
    exp = run.exp
    plan, header = decode_plan(msg.content, run.round0)
    if header["client-id"] != pid:
        raise ValueError(f"a plan for client {header['client-id']} reached the node of partition {pid}")
    # The deltas folded in earlier rounds first (a fresh process holds none; merge skips those a model
    # holds), then the plan's own, which fit() folds in.
    folded = _folded_deltas(context)
    for version in sorted(folded):
        exp.model.merge(version, AdapterWeights.from_tensors(from_record(folded[version])))
    trainer = LocalTrainer(exp.model, settings.train, exp.collate, progress=False)
    client = FederatedClient(pid, exp.train.subset(exp.partitions[pid]), trainer)
    _, result = client.fit(plan, header["seed"])
    for delta in plan.merge:
        context.state[f"{_DELTA}{delta.version}"] = to_record(delta.weights.tensors())
    log.info(
        "round %d: client %d trained at rank %d, loss %.4f",
        header["round"], pid, plan.adapter.rank, result.mean_loss,
    )
    return Message(encode_update(plan, result), reply_to=msg)


def _folded_deltas(context: Context) -> dict[int, ArrayRecord]:
    return {
        int(key.removeprefix(_DELTA)): record
        for key, record in context.state.array_records.items()
        if key.startswith(_DELTA)
    }
