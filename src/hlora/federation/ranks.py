"""Which rank each client trains at (METHOD.md "Setting"): the `[lora]` rank policy, made concrete.

Rank tiers stand for clients with different memory, compute and bandwidth. Three policies:

- `fixed`: every client gets `lora.rank`.
- `tiers`: `lora.tiers` are the ranks, `lora.tier_shares` the fraction of clients in each (equal when
  unset). Tier `i` gets `floor(K s_i)` clients and the clients left over go one each to the tiers with
  the largest remainders `K s_i - floor(K s_i)` (ties to the earlier tier), so every count is within one
  of its share; which clients land in which tier is a seeded shuffle of the client ids.
- `data_size`: `r_k = max(1, floor(q_k / K * rank))`, `q_k` = the number of clients with no more data
  than client `k` (itself included), so the largest client gets `rank` and ranks grow with data size.

The server's bank rank `r_g` is `lora.bank_rank`, or the largest client rank when unset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from hlora.config import LoraSettings
from hlora.errors import ConfigError
from hlora.seeding import tier_seed


def assign_ranks(lora: LoraSettings, client_sizes: Sequence[int], seed: int) -> dict[int, int]:
    """Each client's rank, `{client id: r_k}` for ids `0 .. K-1`, by `lora.rank_policy`.

    `client_sizes[k]` is client `k`'s number of training samples (used by `data_size` only; the other
    policies need only `K = len(client_sizes)`). Deterministic for a `seed`.
    """
    num_clients = len(client_sizes)
    if lora.rank_policy == "fixed":
        return {cid: lora.rank for cid in range(num_clients)}
    if lora.rank_policy == "tiers":
        return _tiered(lora.tiers, lora.tier_shares, num_clients, seed)
    if lora.rank_policy == "data_size":
        return _by_data_size(client_sizes, lora.rank)
    raise ValueError(f"unknown rank policy {lora.rank_policy!r}")  # config validation keeps this out


def tier_counts(num_clients: int, shares: Sequence[float]) -> list[int]:
    """How many of `num_clients` clients each tier gets: largest-remainder rounding of `K * s_i`.

    `shares` are positive and normalised here. Exact (rational) arithmetic, so equal shares give equal
    floors however the floats round; the counts sum to `num_clients`.
    """
    exact = [Fraction(s) for s in shares]
    total = sum(exact)
    quotas = [num_clients * s / total for s in exact]
    counts = [int(q) for q in quotas]  # floor: quotas are non-negative
    left = num_clients - sum(counts)
    by_remainder = sorted(range(len(quotas)), key=lambda i: -(quotas[i] - counts[i]))  # stable: ties in order
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


def _tiered(
    tiers: Sequence[int], shares: Sequence[float] | None, num_clients: int, seed: int
) -> dict[int, int]:
    counts = tier_counts(num_clients, shares if shares is not None else [1.0] * len(tiers))
    order = np.random.default_rng(tier_seed(seed)).permutation(num_clients)
    ranks: dict[int, int] = {}
    start = 0
    for rank, count in zip(tiers, counts, strict=True):
        for cid in order[start : start + count]:
            ranks[int(cid)] = int(rank)
        start += count
    return dict(sorted(ranks.items()))


def _by_data_size(client_sizes: Sequence[int], max_rank: int) -> dict[int, int]:
    sizes = np.asarray(client_sizes)
    num_clients = len(sizes)
    return {
        cid: max(1, int(np.count_nonzero(sizes <= sizes[cid])) * max_rank // num_clients)
        for cid in range(num_clients)
    }


def resolve_bank_rank(lora: LoraSettings, client_ranks: Mapping[int, int]) -> int:
    """The server's global rank `r_g`: `lora.bank_rank`, else the largest client rank. ConfigError if a
    client's rank does not fit in it."""
    largest = max(client_ranks.values(), default=lora.rank)
    bank_rank = lora.bank_rank if lora.bank_rank is not None else largest
    if bank_rank < largest:
        raise ConfigError(f"lora.bank_rank ({bank_rank}) is below the largest client rank ({largest})")
    return bank_rank
