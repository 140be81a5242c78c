"""Which evaluated rounds' global model gives every dev row one class: a federation that fell into the
majority class (BENCHMARKS.md, the paper regime's seed 1) scores the majority share and looks, in the
accuracy table, like a weak model rather than a dead one.

A round is read from its recorded `prediction_spread` (the share of rows given each class, the logits'
spread: `hlora.evaluation.prediction_spread`) or, in runs made before rounds recorded it, from its
accuracy and F1 (`one_class_from_scores`: exact on a two-class task whose F1 is the positive class's).
The local reference is left out: its rows are means over clients, which no single model gave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hlora.evaluation import CONSTANT_LOGITS, FLAT_FEATURES
from hlora.experiments.compare import LOCAL
from hlora.federation.metrics import evaluated_rows, last_layer_variation

RECORDED = "recorded"
FROM_SCORES = "accuracy and F1"


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)


def one_class_from_scores(accuracy: float | None, f1: float | None, majority: float | None) -> bool | None:
    """Whether a two-class model gave every row the majority class, from its accuracy, the F1 of the
    positive class and the majority class's share `majority` (m); None where these cannot tell.

    With TP, TN, FP, FN over n rows, F1 = 2TP / (TP + n - TN), and F1 = 2a / (1 + a) (a the accuracy,
    below 1) exactly when TN = 0. Every row given the majority class is a = m with F1 = 2m / (1 + m)
    (the positive class is the majority: TN = 0, and TP = a n = P) or F1 = 0 (it is the minority: TP =
    0, and TN = a n = N); a mixed model can have neither, since either one with a = m forces it to be
    one class (TN = 0 leaves a <= P / n, TP = 0 leaves a <= N / n, and only the majority's share reaches m).
    Every row given the minority class is a = 1 - m, where a mixed model can score the same pair, so
    that accuracy is undecided (None) where F1 is one of the two values; any other accuracy is not one
    class. Without F1 (or a majority, or with classes level) nothing is decided."""
    if accuracy is None or f1 is None or majority is None or _same(majority, 0.5) or majority < 0.5:
        return None
    one_class_f1 = _same(f1, 0.0) or _same(f1, 2 * accuracy / (1 + accuracy))
    if _same(accuracy, majority):
        return one_class_f1
    if _same(accuracy, 1 - majority) and one_class_f1:
        return None
    return False


def one_class(row: dict[str, Any], majority: float | None) -> tuple[bool | None, str]:
    """Whether an evaluated row's model gave every dev row one class, and what that was read from."""
    spread = row.get("prediction_spread")
    if spread:
        return max(spread["predicted_share"].values()) >= 1.0, RECORDED
    return one_class_from_scores(row.get("accuracy"), row.get("f1"), majority), FROM_SCORES


@dataclass(frozen=True)
class OneClassRun:
    """One run's evaluated rounds, as `one_class` reads them."""

    group: str
    seed: int
    evaluated: int
    one_class: int  # rounds read as one class
    undecided: int  # rounds the scores cannot decide (`one_class_from_scores` None)
    since: int | None  # the first round of the one-class rounds that run to the last evaluated one
    same_logits: int | None  # rounds whose logits did not vary over the rows; None: not recorded
    read_from: str  # RECORDED, FROM_SCORES or both, "; "-joined
    # (rounds whose last layer's features did not vary over the rows, rounds that recorded them); None:
    # none did (`feature_variation`, recorded from commit c083ed6)
    flat_features: tuple[int, int] | None = None


def one_class_runs(runs: Sequence[Any]) -> list[OneClassRun]:
    """`OneClassRun` of every run (a `report.SeedRun`: group, seed, rows, majority_baseline) but the
    local reference's, in the order given."""
    found = []
    for run in runs:
        if run.group == LOCAL:
            continue
        rows = evaluated_rows(run.rows)
        read = [one_class(row, run.majority_baseline) for row in rows]
        since = None
        for row, (verdict, _) in reversed(list(zip(rows, read, strict=True))):
            if verdict is not True:
                break
            since = row["round"]
        spreads = [row["prediction_spread"] for row in rows if row.get("prediction_spread")]
        last = [v for v in map(last_layer_variation, rows) if v is not None]
        found.append(OneClassRun(
            run.group, run.seed, len(rows),
            one_class=sum(verdict is True for verdict, _ in read),
            undecided=sum(verdict is None for verdict, _ in read),
            since=since,
            same_logits=sum(s["logit_std"] < CONSTANT_LOGITS for s in spreads) if spreads else None,
            read_from="; ".join(dict.fromkeys(source for _, source in read)),
            flat_features=(sum(v < FLAT_FEATURES for v in last), len(last)) if last else None,
        ))  # fmt: skip
    return found
