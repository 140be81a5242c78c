"""Checks on the figures a client reports about its own training (`TrainResult`: loss, counts, times,
memory) before they enter `metrics.jsonl` and `summary.json`, in every runtime.

A client's figures are claims, like its update: a Flower node can send anything, and an honest one
that diverged sends a NaN loss. A figure that is not a number of its kind, not finite, negative, or
beyond the bounds below is recorded as missing (`None`: left out of the round's loss, the tier's mean
and maximum, the sample count) and named in the round's `invalid_reports`; the update itself is judged
separately (`hlora.federation.validation`), so a bad figure never refuses a good update.

The bounds are far above any honest figure, so that only a broken or lying client meets them:

- `num_samples`: the rows the server gave the client (it partitioned the data, so it knows);
- `steps`: 1 to `WORK_FACTOR` times the steps the round plans for the client's rows;
- `samples_seen`: 0 to `WORK_FACTOR` times the planned steps times `train.batch_size`;
- `mean_loss`: finite, 0 to `MAX_LOSS` (a cross-entropy that large means logits of that size);
- `wall_s`, `step_s`: finite, 0 to `MAX_SECONDS` (a day);
- `peak_bytes`, `state_bytes`: 0 to `MAX_BYTES` (2^50 bytes, a pebibyte).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace

from hlora.client.trainer import local_steps
from hlora.config import TrainSettings
from hlora.protocol import TrainResult

MAX_LOSS = 1e6
MAX_SECONDS = 86_400.0
MAX_BYTES = 2**50
WORK_FACTOR = 2

FIGURES = (
    "num_samples", "steps", "samples_seen", "mean_loss", "wall_s", "step_s", "peak_bytes", "state_bytes"
)


@dataclass(frozen=True)
class PlannedWork:
    """What the server knows of a client's round: its rows and the work they make."""

    num_samples: int  # the client's rows, as the server partitioned them
    steps: int  # the optimizer steps the round plans for them
    batch_size: int


def planned_work(train: TrainSettings, num_rows: int) -> PlannedWork:
    return PlannedWork(num_rows, local_steps(train, num_rows), train.batch_size)


def _count(value: object, low: int, high: float) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _real(value: object, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value)) and 0 <= value <= high


def report_problems(result: TrainResult, plan: PlannedWork) -> list[str]:
    """The names of `result`'s figures that fail their check (see the module), in `FIGURES` order."""
    work = WORK_FACTOR * plan.steps
    checks = {
        "num_samples": _count(result.num_samples, plan.num_samples, plan.num_samples),
        "steps": _count(result.steps, 1, work),
        "samples_seen": _count(result.samples_seen, 0, work * plan.batch_size),
        "mean_loss": _real(result.mean_loss, MAX_LOSS),
        "wall_s": _real(result.wall_s, MAX_SECONDS),
        "step_s": _real(result.step_s, MAX_SECONDS),
        "peak_bytes": _count(result.peak_bytes, 0, MAX_BYTES),
        "state_bytes": _count(result.state_bytes, 0, MAX_BYTES),
    }
    return [name for name in FIGURES if not checks[name]]


def check_reports(
    results: Mapping[int, TrainResult], plans: Mapping[int, PlannedWork]
) -> tuple[dict[int, TrainResult], dict[int, list[str]]]:
    """`results` (by client id) with every figure that fails its check set to None, and `{client id:
    [names of the figures that failed]}` for the clients that had any. `plans` holds each client's
    planned work."""
    checked: dict[int, TrainResult] = {}
    invalid: dict[int, list[str]] = {}
    for cid, result in results.items():
        bad = report_problems(result, plans[cid])
        checked[cid] = replace(result, **dict.fromkeys(bad)) if bad else result
        if bad:
            invalid[cid] = bad
    return checked, invalid
