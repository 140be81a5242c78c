"""What a run leaves behind: its resolved config, the partition, per-round metrics, a summary and a plot.

`metrics.jsonl` holds one JSON object per round and is appended and flushed as each round ends, so a
run that dies keeps every finished round; `summary.json` and `accuracy.png` are written at the end.
`checkpoint/` (`hlora.checkpoint`) holds what a resumed run continues from. While a run plays, its
process holds an OS lock on `.lock` in the folder (`lock_run_dir`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import BaseFileLock, FileLock, Timeout

from hlora.errors import RunDirError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
PARTITION_FILE = "partition.csv"
PLOT_FILE = "accuracy.png"
LOCK_FILE = ".lock"


def default_run_dir(task: str, method: str, name: str | None = None, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / (name or f"{task}-{method}-{stamp}")


def create_run_dir(path: str | Path) -> Path:
    """Create a new run directory; an existing one is never reused or overwritten."""
    path = Path(path)
    if path.exists():
        raise RunDirError(
            f"run directory {path} exists already; choose another --out (runs are never overwritten)"
        )
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {path}: {e.strerror}") from None
    return path


def lock_run_dir(path: Path) -> BaseFileLock:
    """Hold the run directory `path` for this process until `release()`: a second process that would
    play rounds into it (a second `hlora compare` on the same results, a `--resume` of a run still
    going) gets a one-line RunDirError instead of interleaving its rounds with this one's. An OS lock
    (flock): it goes with the process, so a killed run leaves nothing to clear by hand."""
    lock = FileLock(Path(path) / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(
            f"{path} is in use by another hlora process (it holds {LOCK_FILE}): let it finish or stop it"
        ) from None
    return lock


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per round to `metrics.jsonl`."""

    def __init__(self, run_dir: Path, rows: Sequence[dict[str, Any]] = ()) -> None:
        """Start `metrics.jsonl` afresh with `rows` (a resumed run's, from its checkpoint), replacing what
        the file held: a row appended after the checkpoint was made is dropped, not repeated."""
        self.path = run_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = list(rows)
        write_text_atomic(self.path, "".join(json.dumps(row, sort_keys=False) + "\n" for row in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarise(rows: Sequence[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Best and final quality (global, and per rank tier where tiers were scored), totals over the run,
    each tier's cost (mean seconds per local step, largest peak memory), and failed rounds, refused
    updates by reason, lost clients by kind and client figures recorded as missing by name."""
    if not rows:
        return dict(extra, rounds=0)
    scored = evaluated_rows(rows)
    summary: dict[str, Any] = dict(extra)
    summary["rounds"] = len(rows)
    # the last round is always evaluated; a run stopped early ends on its last evaluated one
    final = scored[-1] if scored else {}
    if scored:
        best = max(scored, key=lambda r: (r["accuracy"], -r["round"]))
        summary.update(
            final_accuracy=final["accuracy"], best_accuracy=best["accuracy"], best_round=best["round"]
        )
    summary.update(
        total_uplink_bytes=sum(r["uplink_bytes"] for r in rows),
        total_downlink_bytes=sum(r["downlink_bytes"] for r in rows),
        total_wall_s=round(sum(r["wall_s"] for r in rows), 3),
    )
    if "f1" in final:
        summary["final_f1"] = final["f1"]
        summary["best_f1"] = max(r["f1"] for r in scored)
    for metric in ("accuracy", "f1"):
        if f"tier_{metric}" in final:
            summary[f"final_tier_{metric}"] = final[f"tier_{metric}"]
    step_s = _per_tier(rows, "tier_step_s")
    if step_s:
        summary["mean_tier_step_s"] = {r: round(sum(v) / len(v), 6) for r, v in step_s.items()}
    for key in ("peak_bytes", "state_bytes"):
        per_tier = _per_tier(rows, f"tier_{key}")
        if per_tier:
            summary[f"max_tier_{key}"] = {r: max(v) for r, v in per_tier.items()}
    if any("round_failed" in r for r in rows):  # what went wrong, totalled (hlora.federation.validation)
        summary["failed_rounds"] = sum(bool(r.get("round_failed")) for r in rows)
        summary["rejected_by_reason"] = _counts(rows, "rejected")
        summary["failed_clients_by_kind"] = _counts(rows, "failed_clients")
        summary["corrupted_by_kind"] = _counts(rows, "corrupted_clients")
    if any("invalid_reports" in r for r in rows):  # client figures recorded as missing (federation.reports)
        reports = (names for row in rows for names in row.get("invalid_reports", {}).values())
        names = Counter(name for names in reports for name in names)
        summary["invalid_reports_by_field"] = dict(sorted(names.items()))
    return summary


def evaluated_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the rounds whose global adapter was scored (`eval.every`): those with an accuracy.
    Rows written before `evaluated` existed were all scored, and all have one."""
    return [row for row in rows if "accuracy" in row]


def failures_line(summary: dict[str, Any]) -> str | None:
    """`"1 failed round; rejected: nonfinite 2, norm 1; lost: crash 1"`, or None for a run where
    nothing went wrong."""
    parts = []
    if summary.get("failed_rounds"):
        parts.append(f"{summary['failed_rounds']} failed round{'s' if summary['failed_rounds'] > 1 else ''}")
    for label, key in (("rejected", "rejected_by_reason"), ("lost", "failed_clients_by_kind")):
        if summary.get(key):
            parts.append(f"{label}: " + ", ".join(f"{k} {n}" for k, n in summary[key].items()))
    return "; ".join(parts) or None


def _counts(rows: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    """`{value: how often}` over every round's `{client id: value}` field, values sorted."""
    return dict(sorted(Counter(v for row in rows for v in row.get(key, {}).values()).items()))


def _per_tier(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """`{rank: [value of each round the tier trained in]}` from a per-tier field, ranks ascending;
    missing values (None) left out."""
    values: dict[str, list[Any]] = {}
    for row in rows:
        for rank, value in row.get(key, {}).items():
            if value is not None:
                values.setdefault(rank, []).append(value)
    return dict(sorted(values.items(), key=lambda item: int(item[0])))


def plot_accuracy(
    rows: Sequence[dict[str, Any]], path: Path, title: str, baseline: float | None = None
) -> None:
    """Dev accuracy (and F1 where present) per evaluated round, with the majority-class baseline for
    scale; and, where more than one rank tier was scored, a thinner line for the accuracy each tier holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = evaluated_rows(rows)  # the rounds `eval.every` skipped have no point
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="dev accuracy")
    if rows and "f1" in rows[0]:
        ax.plot(rounds, [r["f1"] for r in rows], marker="s", linestyle="--", label="dev F1 (positive class)")
    tier_accuracy = _per_tier(rows, "tier_accuracy")
    if len(tier_accuracy) > 1 and all(len(v) == len(rows) for v in tier_accuracy.values()):
        for rank, accuracy in tier_accuracy.items():
            ax.plot(rounds, accuracy, linewidth=0.9, marker=".", alpha=0.8, label=f"rank {rank}")
    if baseline is not None and not math.isnan(baseline):
        ax.axhline(baseline, color="grey", linestyle=":", label=f"majority class ({baseline:.3f})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
