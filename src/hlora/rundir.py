"""The run directory: its files' names, its creation, its lock, atomic writes and the metrics log.

A run leaves behind its resolved config, the partition, per-round metrics, a summary and a plot.

`metrics.jsonl` holds one JSON object per round and is appended and flushed as each round ends, so a
run that dies keeps every finished round; `summary.json` and `accuracy.png` are written at the end.
`checkpoint/` (`hlora.checkpoint`) holds what a resumed run continues from. While a run plays, its
process holds an OS lock on `.lock` in the folder (`lock_run_dir`).
"""

from __future__ import annotations

import json
import os
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


def temp_path(path: Path) -> Path:
    """Where `path`'s next version is written before it is renamed into place: `.NAME.tmp` beside it."""
    return path.with_name(f".{path.name}.tmp")


def write_temp(path: Path, data: str | bytes, durable: bool = False) -> Path:
    """Write `data` (text as UTF-8) to `temp_path(path)`; with `durable`, on disk (fsync) before this
    returns. Returns the temporary path, for the caller to rename (`os.replace`) when it commits."""
    tmp = temp_path(path)
    with tmp.open("wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return tmp


def write_text_atomic(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write beside `path`, then rename: a reader never sees half a file (every atomic write of hlora's
    files goes through here, or through `write_temp` where several files commit together)."""
    os.replace(write_temp(path, data, durable), path)


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
