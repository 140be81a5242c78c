"""Splitting the training rows among clients (Dirichlet label skew, per class or per client, or IID), and
a table of the result."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hlora.errors import DataError

PARTITION_SCHEMES: tuple[str, ...] = ("classes", "clients")


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    min_size: int = 1,
    seed: int = 0,
    max_tries: int = 1000,
    scheme: str = "classes",
    size_sigma: float = 1.0,
) -> list[np.ndarray]:
    """Split the row indices of `labels` among `num_clients` clients, with label skew set by `alpha`.

    `scheme` (config `federation.partition`) says what the Dirichlet draws:
    - "classes" (NIID-Bench, Li et al. 2022): for each class, proportions are drawn from
      Dirichlet(alpha * ones(num_clients)) and that class's shuffled indices are cut by them; the whole
      split is drawn again until every client has at least `min_size` rows (at most `max_tries` draws,
      then DataError). Client sizes follow from the draws. Suits few clients with much data each: with
      many clients nearly every draw leaves some client empty.
    - "clients" (Hsu, Qi and Brown 2019): each client draws its own label mix; sizes come from a
      log-normal draw with sigma `size_sigma` (0: equal sizes), at least `min_size` each. Suits many small
      clients; see `_client_mixes`.

    Smaller `alpha` means more skew; `alpha == math.inf` means IID whatever the scheme: all indices
    shuffled and split as evenly as possible.

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
    if scheme not in PARTITION_SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")
    if not (math.isfinite(size_sigma) and size_sigma >= 0):
        raise DataError(f"the client size sigma must be a finite number >= 0, got {size_sigma}")
    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients with at least {min_size} rows each need {num_clients * min_size} rows, "
            f"but there are only {n}"
        )
    rng = np.random.default_rng(seed)

    if math.isinf(alpha):
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "clients":
        return _client_mixes(labels, num_clients, float(alpha), min_size, float(size_sigma), rng)

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


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split into whole numbers in proportion to `weights` (>= 0, not all 0): each gets the floor
    of its exact share, and the rows left over go one each to the largest fractional parts (ties: the
    lower index). Sums to `total`."""
    exact = total * (weights / weights.sum())
    counts = np.floor(exact).astype(np.int64)
    frac = exact - counts
    short = int(total - counts.sum())  # 0 <= short < len(weights), but for float round-off
    order = np.argsort(-frac, kind="stable")
    if short >= 0:
        counts[order[:short]] += 1
    else:  # a share rounded up past a whole number: take back from the smallest fractional parts
        counts[order[::-1][:-short]] -= 1
    return counts


def _client_sizes(
    n: int, num_clients: int, min_size: int, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Client sizes proportional to a log-normal draw with `sigma` (0: equal), each at least `min_size`,
    summing to `n` (needs num_clients * min_size <= n). A client whose share falls below `min_size` gets
    exactly `min_size`, and the others share the rest, again in proportion to their draws."""
    weights = rng.lognormal(0.0, sigma, num_clients)  # sigma 0: all exactly 1
    floored = np.zeros(num_clients, dtype=bool)
    while True:
        # Some client always stays free: were every free share below min_size, n < num_clients * min_size.
        budget = n - min_size * int(floored.sum())
        free = np.flatnonzero(~floored)
        below = free[budget * weights[free] / weights[free].sum() < min_size]
        if len(below) == 0:
            break
        floored[below] = True
    sizes = np.full(num_clients, min_size, dtype=np.int64)
    sizes[free] = _largest_remainder(budget, weights[free])
    return sizes


def _client_mixes(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, sigma: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The "clients" scheme (Hsu, Qi and Brown 2019, arXiv 1909.06335): client k draws its label mix
    q_k ~ Dirichlet(alpha * p), p the classes' shares of the rows, and takes its size's worth of rows in
    those proportions (largest-remainder rounding) from shuffled class pools, without replacement.

    The pools hold exactly the rows the clients take, so near the end a client may find a class it wants
    used up: its remaining rows then come from the classes left, in proportion to q_k restricted to them
    (or to the rows left, where q_k is 0 on all of them). Clients are served in a seeded random order, so
    that this falls on no client id in particular.
    """
    n = len(labels)
    sizes = _client_sizes(n, num_clients, min_size, sigma, rng)
    if n == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    left = np.array([len(pool) for pool in pools], dtype=np.int64)
    mixes = rng.dirichlet(alpha * left / n, size=num_clients)
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_clients
    for client in rng.permutation(num_clients):
        need, take = int(sizes[client]), np.zeros(len(pools), dtype=np.int64)
        while need > 0:
            room = left - take
            weights = np.where(room > 0, mixes[client], 0.0)
            if not weights.sum() > 0:
                weights = room.astype(np.float64)
            # Every class with a share gets at least one row or runs out: each pass makes progress.
            got = np.minimum(_largest_remainder(need, weights), room)
            take += got
            need -= int(got.sum())
        start = [len(pool) - int(r) for pool, r in zip(pools, left, strict=True)]
        parts[client] = np.sort(
            np.concatenate([pool[s : s + t] for pool, s, t in zip(pools, start, take, strict=True)])
        ).astype(np.int64)
        left -= take
    return parts


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
