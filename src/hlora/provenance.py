"""How a run was made: the command, the code (hlora's version and git commit), the libraries and the
hardware, recorded in every run's `summary.json` so that a number in a table can be traced and made
again. Everything here is read, never guessed: a field that cannot be read is None."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("torch", "transformers", "peft", "flwr")



def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding `path` (default: hlora's own source), with `-dirty` when
    tracked files below `path` differ from it (results or notes elsewhere in the checkout do not make
    the code dirty); None outside a checkout, where git tracks nothing below `path`, or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(
            ["git", "-C", str(where), "ls-files", "--", "."],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if not tracked:  # e.g. an installed copy inside a virtual environment that another repo ignores
            return None
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short=7", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


@dataclass(frozen=True)
class Invocation:
    """How this process was started: the command as its user typed it, and the commit of the code it
    runs, read once at the start: a checkout that moves on while a long job runs (a comparison takes
    hours) must not relabel the job's later runs."""

    command: tuple[str, ...]
    commit: str | None


_invocation: Invocation | None = None


def record_invocation(command: Sequence[str]) -> Invocation:
    """Record how this process was started (the `hlora` CLI calls this first thing, with its argv), and
    read the code's commit now. Returns the record."""
    global _invocation
    _invocation = Invocation(tuple(command), git_commit())
    return _invocation


def invocation() -> Invocation:
    """The recorded invocation; where nothing recorded one (a library user), this process's argv, with
    the commit read at this first call."""
    return _invocation if _invocation is not None else record_invocation(sys.argv)


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what `platform` says, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str | None = None) -> dict[str, Any]:
    """The command line, commit, versions and hardware of this process; `device` is the torch device the
    run used (its CUDA name is added when it is a GPU)."""
    import torch

    from hlora import __version__

    started = invocation()
    gpu = None
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "command": shlex.join(started.command),
        "hlora": __version__,
        "commit": started.commit,
        "python": platform.python_version(),
        **{name: _version(name) for name in _LIBRARIES},
        "device": device,
        "gpu": gpu,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the machine's load (runnable threads, averaged over 1, 5 and 15 min) as the run ends: above the
        # run's own threads, something else shared the cores and its timings are inflated
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "finished_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
