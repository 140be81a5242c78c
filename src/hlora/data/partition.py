"""Splitting the training rows among clients (Dirichlet label skew, or IID), and a table of the result."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hlora.errors import DataError


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    min_size: int = 1,
    seed: int = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split the row indices of `labels` among `num_clients` clients, with label skew set by `alpha`.

    For each class, proportions are drawn from Dirichlet(alpha * ones(num_clients)) and that class's
    shuffled indices are cut by them; the whole split is drawn again until every client has at least
    `min_size` rows (at most `max_tries` draws, then DataError). Smaller `alpha` means more skew (and more
    varied client sizes); `alpha == math.inf` means IID: all indices shuffled and split as evenly as possible.

    Deterministic for a `seed`. Returns one sorted int64 index array per client; together they cover every
    row exactly once.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if int(num_clients) != num_clients or num_clients < 1:
        raise DataError(f"the number of clients must be a whole number >= 1, got {num_clients}")
    num_clients = int(num_clients)
    if not alpha > 0:  # also catches NaN
        raise DataError(f"the Dirichlet alpha must be > 0 (math.inf for IID), got {alpha}")
    if min_size < 0:
        raise DataError(f"the minimum client size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients with at least {min_size} rows each need {num_clients * min_size} rows, "
            f"but there are only {n}"
        )
    rng = np.random.default_rng(seed)

    if math.isinf(alpha):
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]

    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max(1, max_tries)):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                buckets[client].append(piece)
        parts = [np.sort(np.concatenate(pieces)).astype(np.int64) for pieces in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"no Dirichlet split of {n} rows ({len(by_class)} classes) gave each of {num_clients} clients at "
        f"least {min_size} rows in {max_tries} tries: alpha={alpha} is too small or min_size too large "
        "for this data"
    )


def partition_table(
    parts: Sequence[np.ndarray], labels: np.ndarray, label_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per client: `client`, `size`, and the count of each label (a column per label name)."""
    labels = np.asarray(labels).reshape(-1)
    rows = []
    for client, idx in enumerate(parts):
        counts = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=len(label_names))
        if len(counts) > len(label_names):
            raise ValueError(f"label id {len(counts) - 1} has no name in {list(label_names)}")
        row: dict[str, Any] = {"client": client, "size": int(len(idx))}
        row.update({name: int(c) for name, c in zip(label_names, counts, strict=True)})
        rows.append(row)
    return rows


def format_partition_table(rows: Sequence[dict[str, Any]]) -> str:
    """`rows` (as from `partition_table`) as an aligned plain-text table, with a total line at the bottom."""
    if not rows:
        return "(no clients)"
    columns = list(rows[0])
    body = [[str(row.get(col, "")) for col in columns] for row in rows]
    total = ["all"]
    for col in columns[1:]:
        values = [row.get(col) for row in rows]
        total.append(str(sum(values)) if all(isinstance(v, int) for v in values) else "")
    table = [columns, *body, total]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in table)


def write_partition_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write `rows` (as from `partition_table`) to a CSV file with a header row."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
