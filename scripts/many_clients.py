"""Does a federation's cost grow with its clients, or only with those a round samples?

Runs the same federation (a config, by default the QQP paper-regime one) with several numbers of clients and
the same number sampled a round, each in its own process, with a fixed number of local steps per client (so
that the clients' data sizes do not change their work), and prints per run: the process's peak resident
memory, and the mean per round of each part of the round's time (`metrics.jsonl`: train, aggregation,
instruments, evaluation, and the rest of `wall_s`) and the checkpoint's size.

    .venv/bin/python scripts/many_clients.py [--clients 100,1000] [--rounds 4] [--method hlora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hlora.rundir import read_metrics

PARTS = ("train_s", "aggregate_s", "instruments_s", "eval_s", "tier_eval_s")  # within wall_s


def run(config: str, clients: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One run in a child process; its peak RSS from `wait4` (that child's own, not the largest so far)."""
    overrides = [
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={args.per_round}",
        f"federation.rounds={args.rounds}",
        f"federation.method={args.method}",
        f"train.local_steps={args.steps}",
        f"eval.every={args.rounds}",
        "eval.tiers=false",
        f"data.max_eval_samples={args.eval_rows}",
    ]
    cmd = [sys.executable, "-m", "hlora", "run", "-c", config, "--out", str(out), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{clients} clients: the run failed:\n{child.stderr.read()[-2000:]}")
    rows = read_metrics(out)
    means = {p: sum(r.get(p, 0.0) for r in rows) / len(rows) for p in PARTS + ("wall_s",)}
    means["rest_s"] = means["wall_s"] - sum(means[p] for p in PARTS)
    means["checkpoint_s"] = sum(r.get("checkpoint_s", 0.0) for r in rows) / len(rows)  # after wall_s
    ckpt = sum(f.stat().st_size for f in (out / "checkpoint").rglob("*") if f.is_file())
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "checkpoint_mib": ckpt / 2**20, **means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/experiments/qqp-paper.toml")
    parser.add_argument("--clients", default="100,1000", help="numbers of clients, comma-separated")
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="local steps per client and round")
    parser.add_argument("--method", default="hlora")
    parser.add_argument("--eval-rows", type=int, default=64, help="dev rows scored in the last round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for clients in [int(c) for c in args.clients.split(",")]:
            results[clients] = run(args.config, clients, args, Path(tmp) / f"k{clients}")
    print(f"{args.method}, {args.per_round} clients a round, {args.rounds} rounds, {args.steps} steps each")
    head = ["clients", "peak RSS MiB", "checkpoint MiB", "train s", "aggregate s", "instruments s", "rest s"]
    head.append("checkpoint s")
    print(" | ".join(head))
    for clients, r in results.items():
        figures = [r["peak_rss_mib"], r["checkpoint_mib"], r["train_s"], r["aggregate_s"], r["instruments_s"]]
        print(
            " | ".join(
                [str(clients)]
                + [f"{x:.3f}" if x < 10 else f"{x:.0f}" for x in figures + [r["rest_s"], r["checkpoint_s"]]]
            )
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
