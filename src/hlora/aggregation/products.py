"""The aggregation math on LoRA factors: pure functions on tensors, usable without any model.

Every function takes the clients' factors as a sequence of pairs `(B_k, A_k)`: `B_k` is `m x r_k`
(out x rank, PEFT's `lora_B.weight`) and `A_k` is `r_k x n` (rank x in, `lora_A.weight`), so client
`k`'s update is `B_k @ A_k` (times the one LoRA scaling that all clients share, METHOD.md "Setting",
which this module never needs). `weights` are the `p_k`, floats or a 1-D tensor, one per pair; they
are normalised to sum to 1.

| function              | METHOD.md rule           | returns                                        |
|-----------------------|--------------------------|------------------------------------------------|
| `factor_mean`         | 1, FedIT                 | `(sum p_k B_k, sum p_k A_k)`, equal ranks only |
| `zero_pad_mean`       | 2, zero-padding          | factors padded to `rank`, then averaged        |
| `aggregate_products`  | 3, HLoRA                 | truncated SVD of the product mean, QR path     |
| `truncate_products`   | 3, HLoRA with feedback   | the same, plus a carried term and the tail cut |
| `aggregate_rank_blocks` | raFLoRA's rank blocks  | each block averaged over its holders, QR path  |
| `dense_product_svd`   | 4, FlexLoRA (reference)  | the same, dense, singular values in `B`        |
| `stack_factors`       | 5, FLoRA                 | `([B_1 ... B_K], [p_1 A_1; ...; p_K A_K])`     |
| `product_mean`        | the exact mean           | the dense `m x n` matrix `sum p_k B_k @ A_k`   |
| `product_norms`       | 2, HetLoRA's weights     | `||B_k @ A_k||_F` per client, never dense      |

All of them compute in float64 and return tensors in the dtype (and on the device) of the first
client's `B`. Bad input (no clients, factors that do not fit, bad weights, a rank below 1) raises
`ValueError` with a message that names the offending client.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FactorPair",
    "aggregate_products",
    "aggregate_rank_blocks",
    "block_weights",
    "dense_product_svd",
    "factor_mean",
    "normalise_weights",
    "product_mean",
    "product_norms",
    "rank_blocks",
    "stack_factors",
    "truncate_products",
    "Truncation",
    "zero_pad_mean",
]

FactorPair = tuple[Tensor, Tensor]
"""One client's LoRA factors `(B, A)`: `B` is `m x r`, `A` is `r x n`."""

_WORK_DTYPE = torch.float64


class _Clients(NamedTuple):
    """Validated input: the factors in float64 on one device, and the normalised weights."""

    Bs: list[Tensor]  # each m x r_k, float64
    As: list[Tensor]  # each r_k x n, float64
    p: Tensor  # K, float64, sums to 1 (a carried term, `_with_carry`, adds one weight 1 on top)
    ranks: list[int]  # r_k
    m: int
    n: int
    dtype: torch.dtype  # the dtype results are returned in
    device: torch.device

    @property
    def total_rank(self) -> int:
        """`R = sum r_k`, the most components the product mean can have."""
        return sum(self.ranks)

    def factor_scale(self) -> Tensor:
        """`||Bc||_F ||Ac||_F` (the stacked, weighted factors of `aggregate_products`): a bound on every
        singular value of the product mean, and the size that its round-off is relative to, whichever
        way it is computed. A float64 scalar."""
        nb = torch.stack([w * B.square().sum() for w, B in zip(self.p, self.Bs, strict=True)]).sum().sqrt()
        na = torch.stack([w * A.square().sum() for w, A in zip(self.p, self.As, strict=True)]).sum().sqrt()
        return nb * na


def normalise_weights(weights: Sequence[float] | Tensor, count: int) -> Tensor:
    """The weights `p_k` divided by their sum, computed so that no finite input overflows.

    The weights are divided by the largest first (each is then in `[0, 1]`, their sum at most `count`),
    so `[1e308, 1e308]` gives `[0.5, 0.5]` as `[1, 1]` does, not the zeros of `x / inf`.

    Args:
        weights: `count` finite, non-negative numbers (a sequence or a 1-D tensor) with a positive sum.
        count: the number of clients the weights belong to.

    Returns:
        A float64 tensor of shape `(count,)` that sums to 1.

    Raises:
        ValueError: wrong count or shape, a non-finite or negative weight, or a sum that is not positive.
    """
    try:
        w = torch.as_tensor(weights, dtype=_WORK_DTYPE).detach().cpu()
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"weights must be numbers, got {weights!r}: {e}") from None
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence, got shape {tuple(w.shape)}")
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} clients")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    largest = w.max()
    if largest <= 0:
        raise ValueError(f"weights must have a positive sum, got {w.tolist()}")
    w = w / largest
    return w / w.sum()


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}") from None
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank


def _clients(factors: Sequence[FactorPair], weights: Sequence[float] | Tensor) -> _Clients:
    """Validate the clients' factor pairs and weights (the one place every function checks its input)."""
    factors = list(factors)
    if not factors:
        raise ValueError("no client factors to aggregate")
    Bs: list[Tensor] = []
    As: list[Tensor] = []
    for k, pair in enumerate(factors):
        try:
            B, A = pair
        except (TypeError, ValueError):
            raise ValueError(f"client {k}: expected a (B, A) pair, got {type(pair).__name__}") from None
        if not isinstance(B, Tensor) or not isinstance(A, Tensor):
            raise ValueError(f"client {k}: B, A must be tensors, got {type(B).__name__}, {type(A).__name__}")
        if B.ndim != 2 or A.ndim != 2:
            raise ValueError(f"client {k}: B and A must be 2-D, got {tuple(B.shape)}, {tuple(A.shape)}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"client {k}: inner ranks differ, B is {tuple(B.shape)} (m x r), A {tuple(A.shape)} (r x n)"
            )
        if min(*B.shape, A.shape[1]) < 1:
            raise ValueError(f"client {k}: empty factors, B is {tuple(B.shape)}, A is {tuple(A.shape)}")
        Bs.append(B)
        As.append(A)
    m, n = Bs[0].shape[0], As[0].shape[1]
    for k, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.shape[0] != m or A.shape[1] != n:
            raise ValueError(
                f"client {k} adapts a {B.shape[0]} x {A.shape[1]} weight, client 0 a {m} x {n} weight"
            )
    first = Bs[0]
    dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
    device = first.device
    p = normalise_weights(weights, len(factors)).to(device)
    return _Clients(
        Bs=[B.detach().to(device=device, dtype=_WORK_DTYPE) for B in Bs],
        As=[A.detach().to(device=device, dtype=_WORK_DTYPE) for A in As],
        p=p,
        ranks=[B.shape[1] for B in Bs],
        m=m,
        n=n,
        dtype=dtype,
        device=device,
    )


def _dense_mean(c: _Clients) -> Tensor:
    """`sum_k p_k B_k @ A_k` in float64 (m x n): builds the dense matrix."""
    out = torch.zeros(c.m, c.n, dtype=_WORK_DTYPE, device=c.device)
    for w, B, A in zip(c.p, c.Bs, c.As, strict=True):
        out.addmm_(B, A, alpha=float(w))
    return out


def _svd_factors(c: _Clients, U: Tensor, S: Tensor, Vh: Tensor, rank: int, balanced: bool) -> FactorPair:
    """Turn a thin SVD `U diag(S) Vh` of the product mean into factors with exactly `rank` components.

    `U` is `m x q`, `S` is `q` (descending), `Vh` is `q x n`. Singular values at round-off level count
    as zero, and their components are zero in both factors, so that directions picked by round-off never
    reach the clients. Round-off is relative to the factors the mean was computed from,
    `tol = ||Bc||_F ||Ac||_F * max(m, n, R) * eps` (`c.factor_scale()`), not to `S[0]`: where client
    updates cancel, `S[0]` is itself round-off, and a threshold relative to it would keep it. (Should
    that scale overflow, as only factors of ~1e154 can make it, `S[0]` stands in.) Each remaining column
    of `U` is signed so that its largest-magnitude entry is positive (the matching row of `Vh` flips
    with it), which makes the result independent of client order and LAPACK. Components beyond `q` are
    zero.
    Balanced: `B = U sqrt(S)`, `A = sqrt(S) Vh`; otherwise `B = U S`, `A = Vh` (FlexLoRA).
    """
    keep = _round_off(c, S) < S
    S = torch.where(keep, S, torch.zeros_like(S))
    U, Vh = _fix_signs(U, Vh)
    q = min(rank, S.numel())
    U, S, Vh, keep = U[:, :q], S[:q], Vh[:q], keep[:q]
    if balanced:
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
    else:
        B, A = U * S, Vh * keep[:, None].to(Vh.dtype)
    return _pad(B, A, rank, c)


def _round_off(c: _Clients, S: Tensor) -> Tensor:
    """The singular value at or below which a component of `c`'s product mean is round-off (see
    `_svd_factors`); `S` is the spectrum, whose largest value stands in for an overflowing scale."""
    scale = c.factor_scale()
    if not torch.isfinite(scale):
        scale = S.max().clamp_min(0)
    return scale * max(c.m, c.n, c.total_rank) * torch.finfo(_WORK_DTYPE).eps


def _fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Sign each column of `U` so that its largest-magnitude entry is positive, and the matching row
    of `Vh` with it: the factors then no longer depend on client order or LAPACK."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs[:, None]


def _pad(B: Tensor, A: Tensor, rank: int, c: _Clients) -> FactorPair:
    """Zero columns of `B` and zero rows of `A` up to `rank` components; cast to the output dtype."""
    extra = rank - B.shape[1]
    if extra > 0:
        B = torch.cat([B, B.new_zeros(c.m, extra)], dim=1)
        A = torch.cat([A, A.new_zeros(extra, c.n)], dim=0)
    return B.to(c.dtype), A.to(c.dtype)


def product_mean(factors: Sequence[FactorPair], weights: Sequence[float] | Tensor) -> Tensor:
    """The exact weighted mean of the clients' updates, `dW = sum_k p_k B_k @ A_k`.

    Builds the dense `m x n` matrix (the reference for tests and HLoRA's dense fallback).

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`.
        weights: K weights `p_k` (normalised to sum 1).

    Returns:
        `dW`, `m x n`.
    """
    c = _clients(factors, weights)
    return _dense_mean(c).to(c.dtype)


def product_norms(factors: Sequence[FactorPair]) -> Tensor:
    """The Frobenius norm of each client's update, `||B_k @ A_k||_F`, without building the product.

    `||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T))`, and both `r x r` Gram matrices are
    symmetric, so it is the sum of their elementwise product: cost `O((m + n) r^2)`, not `O(m n r)`.
    (HetLoRA's norm weighting, METHOD.md rule 2.)

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`.

    Returns:
        A float64 tensor of shape `(K,)`, on the first `B`'s device.
    """
    factors = list(factors)
    c = _clients(factors, [1.0] * len(factors))
    squares = [((B.T @ B) * (A @ A.T)).sum() for B, A in zip(c.Bs, c.As, strict=True)]
    return torch.stack(squares).clamp_min(0).sqrt()  # round-off can make a zero norm's square negative


def aggregate_products(
    factors: Sequence[FactorPair], weights: Sequence[float] | Tensor, rank: int
) -> FactorPair:
    """HLoRA (METHOD.md rule 3): the best rank-`rank` factors of the product mean, without building it.

    `dW = sum_k p_k B_k @ A_k = Bc @ Ac` with `Bc = [sqrt(p_1) B_1 ... sqrt(p_K) B_K]` (`m x R`) and
    `Ac = [sqrt(p_1) A_1; ...; sqrt(p_K) A_K]` (`R x n`), `R = sum r_k`. With reduced QRs
    `Bc = Q_B R_B` and `Ac^T = Q_A R_A`, `dW = Q_B (R_B R_A^T) Q_A^T`, so the SVD of the `R x R` core
    `R_B R_A^T = U_c S V_c^T` gives `dW = (Q_B U_c) S (Q_A V_c)^T`: cost `O((m + n) R^2 + R^3)`. Only
    where `R >= min(m, n)` is the dense `dW` built and decomposed instead.

    The result is ordered by descending singular value and split evenly, `B = U sqrt(S)`,
    `A = sqrt(S) V^T`, so for every `r <= rank`, `B[:, :r] @ A[:r]` is the best rank-`r` approximation of
    `dW` (Eckart-Young): a client of rank `r_k` takes the first `r_k` components. If `dW` has fewer than
    `rank` components (`min(R, m, n) < rank`, or exactly dependent updates), the rest are zero.
    Signs are fixed: the largest-magnitude entry of each column of `U` is positive.

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`; ranks may differ.
        weights: K weights `p_k` (normalised to sum 1).
        rank: the server's bank rank `r_g >= 1`.

    Returns:
        `(B, A)`: `B` is `m x rank`, `A` is `rank x n`, in the first factor's dtype.
    """
    rank = _check_rank(rank)
    c = _clients(factors, weights)
    (U, S, Vh), _ = _product_svd(c, rank, 0)
    return _svd_factors(c, U, S, Vh, rank, balanced=True)


_Svd = tuple[Tensor, Tensor, Tensor]


def _product_svd(c: _Clients, rank: int, tail_rank: int) -> tuple[_Svd, _Svd | None]:
    """The leading singular triplets `(U, S, Vh)` of `c`'s product mean for `_svd_factors`, and the next
    `tail_rank` of them (None where `tail_rank` is 0): QR of the stacked factors where `R < min(m, n)`
    (`aggregate_products`), else the dense SVD (then the leading triplets are all of them)."""
    if c.total_rank >= min(c.m, c.n):
        U, S, Vh = torch.linalg.svd(_dense_mean(c), full_matrices=False)
        tail = (U[:, rank : rank + tail_rank], S[rank : rank + tail_rank], Vh[rank : rank + tail_rank])
        return (U, S, Vh), tail if tail_rank else None
    root = c.p.sqrt()
    Bc = torch.cat([w * B for w, B in zip(root, c.Bs, strict=True)], dim=1)  # m x R
    Ac = torch.cat([w * A for w, A in zip(root, c.As, strict=True)], dim=0)  # R x n
    # geqrf keeps each Q as R Householder reflectors: Q is never formed (m x R, n x R), and only the
    # `rank` singular vectors that are kept are rotated back (ormqr), not all R of them.
    H_B, tau_B = torch.geqrf(Bc)  # R_B in the upper triangle of the first R rows
    H_A, tau_A = torch.geqrf(Ac.T)
    R = c.total_rank
    U_c, S, Vh_c = torch.linalg.svd(H_B[:R].triu() @ H_A[:R].triu().T)  # the R x R core
    q = min(rank, R)
    U = _apply_q(H_B, tau_B, U_c[:, :q])  # m x q
    Vh = _apply_q(H_A, tau_A, Vh_c[:q].T).T  # q x n
    tail = None
    if tail_rank:
        # Rotated on their own, so that the kept vectors are the same bits with or without a tail.
        t = slice(q, min(q + tail_rank, R))
        tail = (_apply_q(H_B, tau_B, U_c[:, t]), S[t], _apply_q(H_A, tau_A, Vh_c[t].T).T)
    return (U, S[:q], Vh), tail


def _apply_q(reflectors: Tensor, tau: Tensor, X: Tensor) -> Tensor:
    """`Q @ X` for the thin `Q` (`m x R`) that `geqrf` left as reflectors, `X` is `R x q`: the full
    `m x m` Q times `X` padded with zero rows, which is the same product."""
    padded = X.new_zeros(reflectors.shape[0], X.shape[1])
    padded[: X.shape[0]] = X
    return torch.ormqr(reflectors, tau, padded)


class Truncation(NamedTuple):
    """What `truncate_products` keeps and what it cuts off, both as balanced factors."""

    kept: FactorPair  # (B, A): m x rank, rank x n, as `aggregate_products` returns them
    tail: FactorPair  # (B_E, A_E): m x t, t x n, t <= tail_rank: the next components, round-off left out


def truncate_products(
    factors: Sequence[FactorPair],
    weights: Sequence[float] | Tensor,
    rank: int,
    carry: FactorPair | None = None,
    tail_rank: int = 0,
) -> Truncation:
    """HLoRA with error feedback: the best rank-`rank` factors of `dW + B_E @ A_E`, and what they leave out.

    `dW = sum_k p_k B_k @ A_k` with the `p_k` normalised as in `aggregate_products`; the carried term
    `carry = (B_E, A_E)` is added with weight 1, not normalised with them, as one more block of the
    stacked factors (`Bc = [... sqrt(p_K) B_K, B_E]`, `Ac = [...; sqrt(p_K) A_K; A_E]`), so the dense
    `m x n` matrix is still never built where the stack's total rank is below `min(m, n)`. With
    `X = dW + B_E @ A_E = U S V^T`, `kept` is `aggregate_products`' split of its first `rank` components
    (without `carry`, the same bits as `aggregate_products(factors, weights, rank)`) and `tail` the next
    `tail_rank` components, also split evenly and sign-fixed, with those at round-off level left out, so
    `t` is the number of the tail's components that are not round-off (0: the kept factors are `X`).
    `kept` + `tail` is `X` to round-off while `X` has at most `rank + tail_rank` components; beyond that
    the smallest components are dropped (the best rank-`(rank + tail_rank)` approximation of `X`).

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`; ranks may differ.
        weights: K weights `p_k` (normalised to sum 1).
        rank: the number of components to keep, `>= 1`.
        carry: `(B_E, A_E)`, `B_E` is `m x r_E`, `A_E` is `r_E x n` (`r_E` may be 0), or None.
        tail_rank: the most components of the tail to return, `>= 0`.

    Returns:
        `Truncation(kept=(B, A), tail=(B_E, A_E))`, in the first client factor's dtype.
    """
    rank = _check_rank(rank)
    tail_rank = 0 if tail_rank == 0 else _check_rank(tail_rank)
    c = _clients(factors, weights)
    if carry is not None:
        c = _with_carry(c, carry)
    (U, S, Vh), tail = _product_svd(c, rank, tail_rank)
    kept = _svd_factors(c, U, S, Vh, rank, balanced=True)
    if tail is None:
        return Truncation(kept, (kept[0].new_zeros(c.m, 0), kept[1].new_zeros(0, c.n)))
    U_t, S_t, Vh_t = tail
    t = int((_round_off(c, S) < S_t).sum())  # S_t descends: the components above round-off lead
    U_t, Vh_t = _fix_signs(U_t[:, :t], Vh_t[:t])
    root = S_t[:t].sqrt()
    return Truncation(kept, ((U_t * root).to(c.dtype), (root[:, None] * Vh_t).to(c.dtype)))


def _with_carry(c: _Clients, carry: FactorPair) -> _Clients:
    """`c` with the carried `(B_E, A_E)` as one more block of weight 1 (a carry of rank 0 adds nothing)."""
    try:
        B, A = carry
    except (TypeError, ValueError):
        raise ValueError(f"the carried term must be a (B, A) pair, got {type(carry).__name__}") from None
    if not isinstance(B, Tensor) or not isinstance(A, Tensor) or B.ndim != 2 or A.ndim != 2:
        raise ValueError("the carried term's B and A must be 2-D tensors")
    if B.shape[0] != c.m or A.shape[1] != c.n or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"the carried term (B {tuple(B.shape)}, A {tuple(A.shape)}) does not fit a {c.m} x {c.n} weight"
        )
    if B.shape[1] == 0:
        return c
    return c._replace(
        Bs=[*c.Bs, B.detach().to(device=c.device, dtype=_WORK_DTYPE)],
        As=[*c.As, A.detach().to(device=c.device, dtype=_WORK_DTYPE)],
        p=torch.cat([c.p, c.p.new_ones(1)]),
        ranks=[*c.ranks, B.shape[1]],
    )


def rank_blocks(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The rank blocks of a round: `[0, e_1), [e_1, e_2), ..., [e_{L-1}, e_L)` for its distinct client
    ranks `e_1 < ... < e_L`. A client of rank `r` holds exactly the blocks that end at or below `r`."""
    edges = sorted(set(_check_rank(r) for r in ranks))
    if not edges:
        raise ValueError("no client ranks to cut into blocks")
    return list(zip([0, *edges[:-1]], edges, strict=True))


def block_weights(ranks: Sequence[int], weights: Sequence[float] | Tensor) -> Tensor:
    """raFLoRA's per-block weights: `w_kb = p_k / sum_{j holds b} p_j` where client `k` holds block `b`
    (`r_k >= end_b`), else 0; each block's weights are `p` renormalised over its holders.

    Args:
        ranks: K client ranks `r_k >= 1`.
        weights: K weights `p_k` (normalised to sum 1).

    Returns:
        A float64 tensor `K x L` (`L = len(rank_blocks(ranks))`) whose every column sums to 1.
    """
    return _block_weights(list(ranks), normalise_weights(weights, len(ranks)))


def _block_weights(ranks: list[int], p: Tensor) -> Tensor:
    blocks = rank_blocks(ranks)
    held = torch.tensor([[r >= end for _, end in blocks] for r in ranks], device=p.device)  # K x L
    columns = []
    for b in range(len(blocks)):
        if bool(held[:, b].all()):
            columns.append(p)  # every client holds it (block 0 always): p itself, already normalised
            continue
        w = torch.where(held[:, b], p, torch.zeros_like(p))
        total = w.sum()
        columns.append(w / total if total > 0 else w)  # holders all of weight 0: the block adds nothing
    return torch.stack(columns, dim=1)


def aggregate_rank_blocks(
    factors: Sequence[FactorPair], weights: Sequence[float] | Tensor, rank: int
) -> FactorPair:
    """Rank-block averaging (raFLoRA, arXiv 2602.13486): each rank block of the product averaged over
    the clients that hold it, then re-factored like HLoRA, without building the dense sum.

    Client `k`'s components `0..r_k-1` are aligned across clients (each started from the global adapter's
    leading components). With the blocks of `rank_blocks` and the weights `w_kb` of `block_weights`,
    `G = sum_b sum_{k holds b} w_kb B_k[:, b] @ A_k[b]`: block `b` is its holders' weighted mean, not
    diluted by the clients that lack it. This is one weighted stack: column `i` of `B_k` and row `i` of
    `A_k` scaled by `sqrt(w_k,b(i))`, so `aggregate_products`' QR path (or its dense fallback where
    `R >= min(m, n)`) gives `G`'s best rank-`rank` factors, split evenly, signs fixed, zero-padded.
    With one rank for all there is one block, `w_k0 = p_k`, and `G` is HLoRA's product mean.

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`; ranks may differ.
        weights: K weights `p_k` (normalised to sum 1).
        rank: the server's bank rank `r_g >= 1`.

    Returns:
        `(B, A)`: `B` is `m x rank`, `A` is `rank x n`, in the first factor's dtype.
    """
    rank = _check_rank(rank)
    c = _clients(factors, weights)
    W = _block_weights(c.ranks, c.p)
    blocks = rank_blocks(c.ranks)
    Bs, As = [], []
    for k, (B, A, r) in enumerate(zip(c.Bs, c.As, c.ranks, strict=True)):
        per_component = torch.cat([W[k, b].expand(hi - lo) for b, (lo, hi) in enumerate(blocks) if hi <= r])
        root = per_component.sqrt()
        Bs.append(B * root)
        As.append(root[:, None] * A)
    # The weights now live in the factors: p = 1 makes `_dense_mean` and the round-off scale of
    # `_svd_factors` (`||Bc||_F ||Ac||_F`) those of the weighted stack.
    stacked = c._replace(Bs=Bs, As=As, p=torch.ones_like(c.p))
    (U, S, Vh), _ = _product_svd(stacked, rank, 0)
    return _svd_factors(stacked, U, S, Vh, rank, balanced=True)


def dense_product_svd(
    factors: Sequence[FactorPair], weights: Sequence[float] | Tensor, rank: int
) -> FactorPair:
    """FlexLoRA (METHOD.md rule 4): the product mean built densely, full SVD, truncated to `rank`.

    `dW = sum_k p_k B_k @ A_k` (`m x n`, built), `dW = U S V^T`; FlexLoRA puts the singular values into
    `B`: `B = U[:, :rank] S[:rank]`, `A = V^T[:rank]` (rows of `A` are orthonormal). `B @ A` equals
    HLoRA's; only the split differs. Same validation, sign convention and zero padding as
    `aggregate_products` (components with a zero singular value are zero in both factors).

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`.
        weights: K weights `p_k` (normalised to sum 1).
        rank: the number of components to keep, `>= 1`.

    Returns:
        `(B, A)`: `B` is `m x rank`, `A` is `rank x n`, in the first factor's dtype.
    """
    rank = _check_rank(rank)
    c = _clients(factors, weights)
    U, S, Vh = torch.linalg.svd(_dense_mean(c), full_matrices=False)
    return _svd_factors(c, U, S, Vh, rank, balanced=False)


def zero_pad_mean(factors: Sequence[FactorPair], weights: Sequence[float] | Tensor, rank: int) -> FactorPair:
    """Zero-padding (METHOD.md rule 2, HetLoRA-style): pad every client to `rank`, then average.

    `A_k` gets zero rows and `B_k` zero columns up to `rank`; `A = sum p_k pad(A_k)`,
    `B = sum p_k pad(B_k)`. Biased (`B @ A != sum p_k B_k @ A_k` in general), and a component that only
    high-rank clients have is diluted by the others' zeros. For HetLoRA's norm-based weighting, pass
    weights proportional to `||B_k @ A_k||_F`.

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`, every `r_k <= rank`.
        weights: K weights `p_k` (normalised to sum 1).
        rank: the padded rank `r_max >= 1`.

    Returns:
        `(B, A)`: `B` is `m x rank`, `A` is `rank x n`, in the first factor's dtype.

    Raises:
        ValueError: a client rank above `rank`, or any invalid input.
    """
    rank = _check_rank(rank)
    c = _clients(factors, weights)
    too_big = [(k, r) for k, r in enumerate(c.ranks) if r > rank]
    if too_big:
        raise ValueError(f"zero-padding to rank {rank} cannot hold clients (index, rank) {too_big}")
    B = torch.zeros(c.m, rank, dtype=_WORK_DTYPE, device=c.device)
    A = torch.zeros(rank, c.n, dtype=_WORK_DTYPE, device=c.device)
    for w, Bk, Ak, r in zip(c.p, c.Bs, c.As, c.ranks, strict=True):
        B[:, :r] += w * Bk
        A[:r] += w * Ak
    return _pad(B, A, rank, c)


def factor_mean(factors: Sequence[FactorPair], weights: Sequence[float] | Tensor) -> FactorPair:
    """FedIT (METHOD.md rule 1): `B = sum p_k B_k`, `A = sum p_k A_k`; every client must have one rank.

    Biased: `B @ A != sum p_k B_k @ A_k` in general.

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r`, `A_k` is `r x n`, one `r` for all.
        weights: K weights `p_k` (normalised to sum 1).

    Returns:
        `(B, A)`: `B` is `m x r`, `A` is `r x n`, in the first factor's dtype.

    Raises:
        ValueError: unequal ranks (the message lists them), or any invalid input.
    """
    c = _clients(factors, weights)
    seen = sorted(set(c.ranks))
    if len(seen) > 1:
        raise ValueError(f"factor averaging needs equal ranks, got ranks {seen}")
    B = sum((w * Bk for w, Bk in zip(c.p, c.Bs, strict=True)), torch.zeros_like(c.Bs[0]))
    A = sum((w * Ak for w, Ak in zip(c.p, c.As, strict=True)), torch.zeros_like(c.As[0]))
    return B.to(c.dtype), A.to(c.dtype)


def stack_factors(factors: Sequence[FactorPair], weights: Sequence[float] | Tensor) -> FactorPair:
    """FLoRA (METHOD.md rule 5): stack the clients' factors, `B* @ A* = sum p_k B_k @ A_k` exactly.

    `B* = [B_1 ... B_K]` (`m x R`), `A* = [p_1 A_1; ...; p_K A_K]` (`R x n`), `R = sum r_k`, clients in
    the order given.

    Args:
        factors: K pairs `(B_k, A_k)`, `B_k` is `m x r_k`, `A_k` is `r_k x n`.
        weights: K weights `p_k` (normalised to sum 1).

    Returns:
        `(B*, A*)`: `B*` is `m x R`, `A*` is `R x n`, in the first factor's dtype.
    """
    c = _clients(factors, weights)
    B = torch.cat(c.Bs, dim=1)
    A = torch.cat([w * Ak for w, Ak in zip(c.p, c.As, strict=True)], dim=0)
    return B.to(c.dtype), A.to(c.dtype)
