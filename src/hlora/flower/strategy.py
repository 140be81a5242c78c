"""A Flower strategy that is the simulation's round loop with Flower's messages as the exchange.

`configure_train` asks the shared `RoundLoop` for the round's plans and sends each node its plan's
`downlink()`, cut to its rank; `aggregate_train` reads the replies back into updates and hands them to
`RoundLoop.finish`, which aggregates through `FederatedServer` (so every reply is validated against the
plan its node was given), evaluates on the server, writes the metrics row and commits the checkpoint,
exactly as in the simulation. Evaluation is the server's: `configure_evaluate` sends nothing.

A node whose reply does not come before the round's timeout, or comes as an error, is recorded in the
round's `failed_clients`; a reply that does not decode is refused like an invalid update. The round
aggregates what is left, down to `federation.min_clients`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hlora.config import settings_to_toml
from hlora.federation.metrics import round_line
from hlora.federation.round import Replies, RoundLoop
from hlora.federation.server import RoundTraffic
from hlora.federation.validation import Rejection
from hlora.flower.node_config import NODE_RECORD
from hlora.flower.wire import (
    PLAN_ARRAYS,
    RUN_CONFIG,
    UPDATE_ARRAYS,
    WireError,
    decode_update,
    encode_plan,
    record_bytes,
    to_record,
)
from hlora.protocol import ClientPlan, ClientUpdate, TrainResult
from hlora.seeding import client_seed

log = logging.getLogger("hlora.flower")

# What `failed_clients` says of a node whose reply never became an update (beside the simulation's
# "crash" and "timeout").
_ERROR_KINDS = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "crash",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "crash",
    ErrorCode.CLIENT_APP_CRASHED: "crash",
    ErrorCode.NODE_UNAVAILABLE: "unavailable",
    ErrorCode.MESSAGE_UNAVAILABLE: "timeout",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "timeout",
}


class HloraStrategy(Strategy):
    """Plays the rounds of `loop` over Flower. `nodes` maps each client id (a partition) to the id of
    the SuperNode that holds it; `first_round` is the loop's next round (after a resume, not 1)."""

    def __init__(
        self, loop: RoundLoop, nodes: Mapping[int, int], first_round: int = 1, query_timeout: float = 60.0
    ) -> None:
        self.loop = loop
        self.nodes = dict(nodes)
        self.query_timeout = query_timeout  # how long a round waits for new nodes to say their partition
        self._strangers: set[int] = set()  # connected nodes that hold no partition of this run
        self.offset = first_round - 1  # Flower counts this process's rounds from 1
        settings = loop.exp.settings
        self.rounds = settings.federation.rounds
        self.seed = settings.run.seed
        self.config_toml = settings_to_toml(settings)
        self._plans: dict[int, ClientPlan] = {}
        self._sent: dict[int, Message] = {}  # client id -> the train message sent this round
        self._down: dict[int, int] = {}  # client id -> tensor bytes of its plan, as sent
        self._lost: dict[int, str] = {}

    def summary(self) -> None:
        s = self.loop.exp.settings
        clients, nodes = len(self.loop.exp.client_ranks), len(self.nodes)
        log.info(
            "hlora over Flower: %s, %d clients on %d nodes, rounds %d..%d",
            s.federation.method, clients, nodes, self.offset + 1, self.rounds,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per planned client, to the node of its partition, holding only what its
        plan sends down. A node the SuperLink no longer lists is not sent anything."""
        rnd = server_round + self.offset
        self._plans, self._sent = {}, {}
        if self.loop.stopped is not None or self.loop.stop_reason(rnd) is not None:
            return []  # the privacy budget is spent: the remaining rounds send nothing and aggregate nothing
        online = set(grid.get_node_ids())
        self._adopt(grid, online, rnd)  # before the plans: an adopted node's plan starts from scratch
        self._plans = self.loop.configure(rnd)
        self._sent, self._down, self._lost = {}, {}, {}
        for cid, plan in self._plans.items():
            node = self.nodes.get(cid)
            if node is None or node not in online:
                self._lost[cid] = "unavailable"
                self._down[cid] = 0
                log.warning("round %d: client %d: its node is not connected; nothing sent", rnd, cid)
                continue
            content = encode_plan(plan, cid, rnd, client_seed(self.seed, rnd, cid))
            self._down[cid] = record_bytes(content.array_records[PLAN_ARRAYS])
            content[RUN_CONFIG] = ConfigRecord({"toml": self.config_toml})
            self._sent[cid] = Message(
                content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(rnd)
            )
        return list(self._sent.values())

    def _adopt(self, grid: Grid, online: set[int], rnd: int) -> None:
        """A node the SuperLink lists that this run does not know (a SuperNode that restarted gets a new
        id) is asked its partition. It takes that partition's place if the partition's node is gone or
        sent nothing last round (the SuperLink lists a dead node for a while), and is sent everything
        from scratch (`FederatedServer.forget_clients`). One that fits no partition is not asked again;
        one whose partition's node is well is asked again next round."""
        new = sorted(online - set(self.nodes.values()) - self._strangers)
        if not new:
            return
        for node, (pid, num) in ask_partitions(grid, new, self.query_timeout).items():
            why = claim_problem(node, pid, num, len(self.loop.exp.client_ranks), None)
            if why is not None:
                self._strangers.add(node)
                log.warning("round %d: node %d ignored: %s", rnd, node, why)
                continue
            old = self.nodes.get(pid)
            if old is not None and old in online and pid not in self._lost:
                log.warning("round %d: node %d also says it holds partition %d; node %d keeps it",
                            rnd, node, pid, old)
                continue
            self.nodes[pid] = node
            self.loop.exp.server.forget_clients([pid])
            log.info("round %d: partition %d is now on node %d", rnd, pid, node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read the replies into updates and finish the round through the shared loop."""
        rnd = server_round + self.offset
        if self.loop.stopped is not None:  # the run ended at its privacy budget (configure_train)
            return None, None
        client_of = {msg.metadata.message_id: cid for cid, msg in self._sent.items()}
        updates: list[ClientUpdate] = []
        results: dict[int, TrainResult] = {}
        unreadable: dict[int, Rejection] = {}
        up: dict[int, int] = {}
        answered: set[int] = set()
        for reply in replies:
            cid = client_of.get(reply.metadata.reply_to_message_id)
            if cid is None:
                log.warning("round %d: a reply to no message of this round, ignored", rnd)
                continue
            answered.add(cid)
            if reply.has_error():
                self._lost[cid] = _ERROR_KINDS.get(reply.error.code, "error")
                log.warning("round %d: client %d replied with an error: %s", rnd, cid, reply.error.reason)
                continue
            try:
                update, result = decode_update(reply.content, cid, self._plans[cid])
            except WireError as e:
                unreadable[cid] = Rejection("malformed", f"the reply does not decode: {e}")
                arrays = reply.content.array_records.get(UPDATE_ARRAYS)
                if arrays is not None:  # it travelled all the same
                    up[cid] = record_bytes(arrays)
                continue
            updates.append(update)
            results[cid] = result
            up[cid] = record_bytes(reply.content.array_records[UPDATE_ARRAYS])
        for cid in sorted(self._sent.keys() - answered):
            self._lost[cid] = "timeout"
            log.warning("round %d: client %d (node %d) did not reply in time", rnd, cid, self.nodes[cid])
        sent = RoundTraffic(uplink_bytes_by_client=up, downlink_bytes_by_client=dict(self._down))
        row = self.loop.finish(rnd, self._plans, Replies(updates, results, self._lost, unreadable, sent=sent))
        log.info("%s", round_line(row, self.rounds))
        metrics = {
            "uplink-bytes": int(row["uplink_bytes"]),
            "downlink-bytes": int(row["downlink_bytes"]),
            "aggregated-clients": len(row["aggregated_clients"]),
        }
        if "accuracy" in row:  # a round that `eval.every` skips has no score
            metrics["accuracy"] = float(row["accuracy"])
        if row["train_loss"] is not None:
            metrics["train-loss"] = float(row["train_loss"])
        return to_record(self.loop.exp.server.global_weights.tensors()), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing: the server evaluates the global model itself, in `aggregate_train`."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def ask_partitions(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, tuple[object, object]]:
    """`{node id: (partition-id, num-partitions)}` of the given nodes that answer a `query` message
    within `timeout` seconds (the ClientApp's `query`): what each node claims, as it came, for the
    caller to check against the run (`claim_problem`)."""
    messages = [
        Message(RecordDict({}), dst_node_id=node, message_type=MessageType.QUERY, group_id="nodes")
        for node in node_ids
    ]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", node, reply.error.reason)
            continue
        try:
            record = reply.content.config_records[NODE_RECORD]
            found[node] = (record["partition-id"], record["num-partitions"])
        except (KeyError, TypeError):
            log.warning("node %d answered the partition query with something else: ignored", node)
    return found


def claim_problem(node: int, pid: object, num: object, num_partitions: int, holder: int | None) -> str | None:
    """Why `node`'s claim to hold partition `pid` of `num` is not taken (None: it is), where the run has
    `num_partitions` partitions and `holder` is the node that holds `pid` already (None if none does).
    Both must be ints as hlora's ClientApp sends them, not a string, float or bool that int() takes."""
    if type(pid) is not int or type(num) is not int:
        return f"partition {repr(pid)[:24]} of {repr(num)[:24]} is not a pair of ints"
    if num != num_partitions:
        return f"partition {pid} of {num}, but the run has federation.num_clients = {num_partitions}"
    if not 0 <= pid < num_partitions:
        return f"partition {pid} is outside 0..{num_partitions - 1}"
    if holder is not None and holder != node:
        return f"partition {pid} is held by node {holder}"
    return None
