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

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hlora.flower.node_config import NODE_RECORD, node_partition

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds. Imports nothing heavy: a process that only answers this starts
    in a second."""
    pid, num = node_partition(context.node_config)
    return Message(
        RecordDict({NODE_RECORD: ConfigRecord({"partition-id": pid, "num-partitions": num})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition as the plan says (`hlora.flower.node.train`)."""
    from hlora.flower import node

    return node.train(msg, context)
