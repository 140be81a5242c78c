"""The ServerApp: prepares the run as the simulation does, finds which node holds which partition, and
plays the rounds with `HloraStrategy`.

Its run config (`[tool.flwr.app.config]` in `flower-app/pyproject.toml`, overridden with
`flwr run --run-config`):

- `config`: the hlora TOML file on the SuperLink's machine ("" for the defaults);
- `set`: `section.key=value` overrides, separated by `;` (as `hlora run --set`);
- `out`: the run directory to create (as `hlora run --out`; "" for `runs/<task>-<method>-<time>`), or
  with `resume = true` the run directory to go on in;
- `reply-timeout`: seconds a round waits for its replies; a node that has not replied by then is
  recorded as lost (`failed_clients`) and the round aggregates what came;
- `node-timeout`: seconds to wait at the start for a node of every partition (and, up to 60, for a
  node that joins later, such as a restarted SuperNode, to say its partition).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hlora import checkpoint
from hlora.config import load_settings
from hlora.errors import HloraError
from hlora.federation.prepared import prepare
from hlora.federation.round import RoundLoop, check_runtime
from hlora.flower.strategy import HloraStrategy, ask_partitions, claim_problem
from hlora.flower.wire import to_record
from hlora.rundir import create_run_dir, default_run_dir
from hlora.seeding import set_rng_state

log = logging.getLogger("hlora.flower")

app = ServerApp()


class NodeError(HloraError):
    """The SuperNodes do not cover the run's partitions (missing, duplicated, or a different count)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    cfg = context.run_config
    overrides = [item.strip() for item in str(cfg.get("set", "")).split(";") if item.strip()]
    out = str(cfg.get("out", ""))
    resume = bool(cfg.get("resume", False))
    ckpt = None
    if resume:
        if not out:
            raise HloraError("resume = true needs out = the run directory to go on in")
        run_dir = Path(out)
        settings, ckpt = checkpoint.open_resume(run_dir, overrides)
        if ckpt is None:
            log.info("%s has no checkpoint yet (no round had finished): starting again from round 1", out)
    else:
        settings = load_settings(str(cfg.get("config", "")) or None, overrides)
    exp = prepare(settings)
    check_runtime(exp.settings, carries_secure=False)  # before anything is written
    # The nodes before the run directory: a run that cannot start writes nothing.
    node_timeout = float(cfg.get("node-timeout", 600))
    nodes = find_nodes(grid, exp.settings.federation.num_clients, node_timeout)
    if not resume:
        s = exp.settings
        run_dir = create_run_dir(out or default_run_dir(s.data.task, s.federation.method, s.run.name))
    log.info("run directory: %s", run_dir)
    loop = RoundLoop(exp, run_dir, ckpt)  # locks the run directory until released
    try:
        if ckpt is not None:
            exp.server.forget_clients()  # a new Flower run: the nodes' state (FLoRA's deltas) starts empty
        strategy = HloraStrategy(loop, nodes, first_round=loop.first, query_timeout=min(node_timeout, 60.0))
        if ckpt is not None:
            set_rng_state(ckpt.rng)  # last: nothing may draw from them before the rounds
        strategy.start(
            grid,
            to_record(exp.server.global_weights.tensors()),
            num_rounds=exp.settings.federation.rounds - loop.first + 1,
            timeout=float(cfg.get("reply-timeout", 600)),
        )
        summary = loop.close()
    finally:
        loop.release()
    log.info("final accuracy %.4f, run directory %s", summary.get("final_accuracy", float("nan")), run_dir)


def find_nodes(grid: Grid, num_partitions: int, timeout: float) -> dict[int, int]:
    """`{partition id: node id}` for every partition, asking each connected node which partition it
    holds (a `query` message). Waits up to `timeout` seconds for a node of every partition.

    A node's answer is a claim, not a fact: one that names a partition outside `0..num_partitions - 1`
    or another count of partitions, or a partition another node already holds (the first claim keeps
    it), is ignored with a warning and never counted, so no node can complete the count with a false
    claim or stop the run by repeating another's. Raises NodeError where a partition has no node by
    then, naming the ignored claims."""
    deadline = time.monotonic() + timeout
    found: dict[int, int] = {}  # partition id -> node id
    answered: set[int] = set()
    ignored: dict[int, str] = {}  # node id -> why its claim was not taken
    while True:
        new = [node for node in grid.get_node_ids() if node not in answered]
        if new:
            wait = max(1.0, min(60.0, deadline - time.monotonic()))
            for node, (pid, num) in ask_partitions(grid, new, wait).items():
                answered.add(node)
                why = claim_problem(node, pid, num, num_partitions, found.get(pid))
                if why is not None:
                    ignored[node] = why
                    log.warning("node %d ignored: %s", node, why)
                    continue
                found[pid] = node
                log.info("partition %d is on node %d", pid, node)
        if len(found) == num_partitions:
            return found
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_partitions)) - found.keys())
            why = "".join(f"; node {node}: {reason}" for node, reason in sorted(ignored.items()))
            raise NodeError(f"no node holds partition(s) {missing} after {timeout:g} s{why}")
        time.sleep(1.0)


def _setup_logging() -> None:
    """The run's log lines (hlora's loggers) on stderr, which Flower streams to `flwr run --stream`."""
    logger = logging.getLogger("hlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
