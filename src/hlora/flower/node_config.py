"""What a SuperNode's own config says: which partition of the run's data it holds. Light on purpose
(no torch, no hlora engine): the ClientApp answers the server's partition query from this alone.
"""

from __future__ import annotations

from typing import Any

NODE_RECORD = "hlora.node"  # a query reply: which partition the node holds


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
