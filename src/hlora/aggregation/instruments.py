"""Per-round instruments of an aggregation: what a rule made of the round's updates, in product space.

Pure functions on LoRA factors, cheap enough to run every round for every method, and never forming a dense
`m x n` product: every figure comes from the triangular factors of thin QRs (`O((m + n) c^2)` for `c`
stacked components), the way `products.aggregate_products` works.

- `singular_values(B, A)`: the spectrum of one update `B @ A`.
- `block_shares(s, edges)`: the share of the update's energy (`sum s_i^2`) in each block of components
  `[0, e_1), [e_1, e_2), ..., [e_last, inf)`; with the rank tiers as edges, it shows rank collapse
  (raFLoRA, arXiv 2602.13486): energy gathering in the components every client holds while the ones only
  high-rank clients train fade. The blocks are cut from the spectrum sorted by size, which is the
  component order of the SVD-based rules and, for any rule, independent of how its factors are split.
- `relative_error(result, factors, weights)`: `||G - M||_F / ||M||_F` of a rule's result `G` against the
  exact product mean `M = sum p_k B_k @ A_k` of the same updates (METHOD.md rule 3's target): aggregation
  bias (zero-padding, FedIT) and truncation (HLoRA above the bank rank) alike.
- `round_instruments(...)`: all of them for one round, summarised over the adapted weights, as the
  `instruments` field of a `metrics.jsonl` row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hlora.weights import LoraFactors

_DTYPE = torch.float64

FactorPair = tuple[Tensor, Tensor]


def _triangles(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """`R_B`, `R_A` of the thin QRs `[B_1 ... B_K] = Q_B R_B` and `[A_1; ...; A_K]^T = Q_A R_A`, so that
    `sum_k B_k @ A_k = Q_B (R_B @ R_A^T) Q_A^T`: the product's norm and spectrum are the core's."""
    B = torch.cat([b.detach().to(_DTYPE) for b in Bs], dim=1)
    A = torch.cat([a.detach().to(_DTYPE) for a in As], dim=0)
    return torch.linalg.qr(B, mode="r").R, torch.linalg.qr(A.T, mode="r").R


def singular_values(B: Tensor, A: Tensor) -> Tensor:
    """The singular values of `B @ A` (`B` is `m x r`, `A` is `r x n`), descending, float64, without
    building the product: those of the small core `R_B R_A^T`."""
    R_B, R_A = _triangles([B], [A])
    return torch.linalg.svdvals(R_B @ R_A.T)


def stacked_norm(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> float:
    """`||sum_k B_k @ A_k||_F` without building any product (the norm of the core `R_B R_A^T`)."""
    R_B, R_A = _triangles(Bs, As)
    return float(torch.linalg.matrix_norm(R_B @ R_A.T))


def relative_error(
    result: FactorPair, factors: Sequence[FactorPair], weights: Sequence[float] | Tensor
) -> float | None:
    """`||B @ A - sum_k p_k B_k @ A_k||_F / ||sum_k p_k B_k @ A_k||_F` for a rule's `result = (B, A)` and
    the clients' `factors` with weights `p_k` (used as given): 0 where the rule keeps the exact mean.
    None where the exact mean is zero (no client moved)."""
    error, exact = _error_and_exact(result, factors, weights)
    return error / exact if exact > 0 else None


def _error_and_exact(
    result: FactorPair, factors: Sequence[FactorPair], weights: Sequence[float] | Tensor
) -> tuple[float, float]:
    """`||G - M||_F` and `||M||_F` for `G = B @ A` and `M = sum_k p_k B_k @ A_k`.

    The difference is itself one stacked product, `[B, B_1 ... B_K] @ [A; -p_1 A_1; ...; -p_K A_K]`, so
    its norm comes from a small core as the mean's does, accurate to round-off relative to the factors
    (not a difference of squared norms, which would lose the digits of a small error)."""
    Bs = [B for B, _ in factors]
    As = [float(w) * A.to(_DTYPE) for w, (_, A) in zip(weights, factors, strict=True)]
    B, A = result
    return stacked_norm([B, *Bs], [A, *(-a for a in As)]), stacked_norm(Bs, As)


def block_edges(ranks: Sequence[int]) -> list[int]:
    """The block edges of a federation: its distinct client ranks, ascending."""
    return sorted(set(int(r) for r in ranks))


def block_labels(edges: Sequence[int]) -> list[str]:
    """`["0-2", "2-4", "4-8", "8-16", "16+"]` for edges `[2, 4, 8, 16]`: one label per block."""
    lows = [0, *edges]
    return [f"{lo}-{hi}" for lo, hi in zip(lows, edges, strict=False)] + [f"{edges[-1]}+"]


def block_shares(s: Tensor, edges: Sequence[int]) -> list[float]:
    """The share of `sum_i s_i^2` in each block `[0, e_1), [e_1, e_2), ..., [e_last, inf)` of the
    descending singular values `s`; all zeros where `s` is. One value per `block_labels(edges)`."""
    energy = s.to(_DTYPE) ** 2
    total = float(energy.sum())
    bounds = [0, *edges, max(energy.numel(), edges[-1])]
    if total == 0:
        return [0.0] * (len(bounds) - 1)
    return [float(energy[lo:hi].sum()) / total for lo, hi in zip(bounds, bounds[1:], strict=False)]


def effective_rank(s: Tensor) -> float | None:
    """Roy and Vetterli's effective rank (EUSIPCO 2007): `exp` of the entropy of `s_i / sum s_j`; `k` for
    `k` equal singular values, 1 for one. None for a zero spectrum."""
    total = float(s.sum())
    if total == 0:
        return None
    q = s[s > 0].to(_DTYPE) / total
    return math.exp(float(-(q * q.log()).sum()))


def round_instruments(
    result: Mapping[str, LoraFactors],
    updates: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    edges: Sequence[int],
    components: int,
) -> dict[str, Any]:
    """The instruments of one aggregation, over every adapted weight of `result` (the rule's global update
    per weight) against the clients' `updates` (their factors per weight) with weights `p_k` (summing to 1).

    Returns (each figure over the adapted weights):
    - `rel_error`: `sqrt(sum_l ||G_l - M_l||^2) / sqrt(sum_l ||M_l||^2)`, the rule's relative error against
      the exact product mean, pooled over the weights (None where every mean is zero);
    - `norm`, `exact_norm`: `sqrt(sum_l ||G_l||^2)` and `sqrt(sum_l ||M_l||^2)`;
    - `sv_share`: for `i < components`, the mean over the weights of `s_i^2 / sum_j s_j^2` (the spectrum's
      shape, each weight counting once);
    - `block_energy`: `{label: mean over the weights of the block's share}` (`block_shares`);
    - `effective_rank`: the mean over the weights of `effective_rank`.
    Weights whose global update is zero are left out of the means (None where all are).
    """
    labels = block_labels(edges)
    err2 = exact2 = norm2 = 0.0
    shares, blocks, ranks = [], [], []
    for layer, g in result.items():
        error, exact = _error_and_exact((g.B, g.A), [(u[layer].B, u[layer].A) for u in updates], weights)
        err2 += error * error  # a product, not `**`: overflow gives inf (recorded as None), not an error
        exact2 += exact * exact
        s = singular_values(g.B, g.A)
        energy = float((s**2).sum())
        norm2 += energy
        if energy == 0:
            continue
        top = (s[:components] ** 2 / energy).tolist()
        shares.append(top + [0.0] * (components - len(top)))
        blocks.append(block_shares(s, edges))
        ranks.append(effective_rank(s))

    def mean(rows: list[list[float]]) -> list[float] | None:
        return [sum(col) / len(rows) for col in zip(*rows, strict=True)] if rows else None

    block_mean = mean(blocks)
    return {
        "rel_error": math.sqrt(err2 / exact2) if exact2 > 0 else None,
        "norm": math.sqrt(norm2),
        "exact_norm": math.sqrt(exact2),
        "sv_share": mean(shares),
        "block_energy": dict(zip(labels, block_mean, strict=True)) if block_mean is not None else None,
        "effective_rank": sum(ranks) / len(ranks) if ranks else None,
    }
