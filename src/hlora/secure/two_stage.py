"""Secure two-stage HLoRA: the product mean's best factors from secure sums alone.

Per adapted weight (`m x n`), with `dW = sum_k p_k B_k A_k` over the round's clients:

- stage 1 (`sketch`): the server sends a seed; every party rebuilds the same Gaussian `Omega` (`n x q`)
  from it; client `k` returns `p_k B_k (A_k Omega)` (`m x q`); the secure sum is `Y = dW Omega`, and the
  server takes `Q`, an orthonormal basis of `Y` (QR).
- power iterations (optional, each two more sums): client `k` returns `p_k (Q^T B_k) A_k`, the sum is
  `Z = Q^T dW` (`q x n`); the server sends `W`, an orthonormal basis of `Z^T`; client `k` returns
  `p_k B_k (A_k W)`, the sum is `dW W`, whose basis is the next `Q` (Halko, Martinsson and Tropp 2011,
  Algorithm 4.4).
- stage 2 (`project`): the server sends `Q`; client `k` returns `p_k (Q^T B_k) A_k` and its head
  `p_k h_k`; the secure sum is `Z = Q^T dW`; with `Z = U_z S V^T`, the global factors are
  `B = Q U_z sqrt(S)`, `A = sqrt(S) V^T` ("balanced", HLoRA's split) or `B = Q U_z S`, `A = V^T`
  ("into_b", FlexLoRA's), cut to the bank rank.

Exact when `q >= rank(dW)` (at most the round's total client rank `R = sum r_k`, the default `q`): then
`range(Q) = range(dW)`, which for `R <= min(m, n)` and updates in general position is the span of every
`B_k`, so `Q Q^T dW' = dW'` for the mean `dW'` over any subset of the stage-1 clients, and a client that
drops between the stages costs nothing but its term (`p` is renormalised over the stage-2 survivors).
With a smaller `q` the result is a randomised SVD, whose error above the Eckart-Young optimum power
iterations reduce. `q` never exceeds `min(m, n)`: there the sketch already spans every column.

Each client sends `q m` numbers in stage 1 and `q n` (plus its head) in stage 2, and receives `Q`
(`q m`): `q (m + n)` a stage per client, against HLoRA's `r_k (m + n)` each way; with the default
`q = R`, every client pays the whole round's rank, not its own.

The sums go through a `Summation` (`hlora.secure.masking.secure_sum`: pairwise masks, fixed point at
`2^-scale_bits`); `plain_sum` is a stand-in with the same result type and no masks, for the tests of the
math. The server side here only ever receives what a summation returns. The math
runs in float64.

With distributed DP (`StagePrivacy`, `hlora.federation.secure`), every sum is a Gaussian mechanism on
the clients' clipped changes: `Omega` is orthonormalised (so that `||D Omega||_F <= ||D||_F` for any
change `D`: every sketch, power iteration and projection has the sensitivity of the change itself),
each request tells the client to clip its change and add its share of the noise, the server adds its own
public part (the mean of what it sent) to each sum in the clear, and nothing is renormalised (DP-FedAvg's
fixed denominator).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from hlora.secure.masking import SecureSumResult, secure_sum
from hlora.weights import AdapterWeights

log = logging.getLogger("hlora")

DTYPE = torch.float64  # what every contribution and every server-side product is computed in
SCALE_BITS = 24  # the summation's fixed-point resolution, 2^-24, as `masking.secure_sum` defaults to
FLOAT_BYTES = 8  # a float64 on the wire (`Q`, `W`, the weight `p_k`)
Split = Literal["balanced", "into_b"]
StageKind = Literal["sketch", "project"]


class Summation(Protocol):
    """A secure summation (`masking.secure_sum`'s signature): the sum of `inputs` (client id -> a flat
    float64 vector, all of one length) over the clients not in `dropouts`, which needs at least
    `threshold` of them (None: the summation's default)."""

    def __call__(
        self,
        inputs: Mapping[int, np.ndarray],
        *,
        dropouts: Iterable[int] = (),
        threshold: int | None = None,
        scale_bits: int = SCALE_BITS,
    ) -> SecureSumResult: ...


def plain_sum(
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Iterable[int] = (),
    threshold: int | None = None,
    scale_bits: int = SCALE_BITS,
) -> SecureSumResult:
    """A stand-in for `masking.secure_sum` with the same result, for tests of the math: the float64 sum
    over the survivors, no masks and no fixed point (`scale_bits` is ignored), the total as the server's
    view, each survivor's vector as its uplink. Raises ValueError with fewer than `threshold` (default 1)
    survivors or vectors of different lengths."""
    dropped = set(dropouts)
    survivors = tuple(sorted(cid for cid in inputs if cid not in dropped))
    if len(survivors) < (threshold or 1):
        raise ValueError(
            f"{len(survivors)} client(s) left for a secure sum, the threshold is {threshold or 1}"
        )
    vectors = [np.asarray(inputs[cid], dtype=np.float64) for cid in survivors]
    if len({v.shape for v in vectors}) != 1 or vectors[0].ndim != 1:
        raise ValueError(
            f"a secure sum needs flat vectors of one length, got {sorted({v.shape for v in vectors})}"
        )
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return SecureSumResult(
        total=total,
        survivors=survivors,
        server_view={"total": total.copy()},
        bytes_up={cid: v.nbytes for cid, v in zip(survivors, vectors, strict=True)},
        bytes_down={cid: 0 for cid in inputs},
    )


def default_summation() -> Summation:
    """The summation of `[secure]` rounds: pairwise-mask secure aggregation (`masking.secure_sum`)."""
    return secure_sum


# The client's side.


@dataclass(frozen=True)
class StageRequest:
    """What the server asks of one client for one secure sum.

    `kind` "sketch": per adapted weight, `p_k B_k (A_k M)` (`m x q`), with `M` (`n x q`) the layer's
    entry of `matrices`, or, where `matrices` is None, the seeded Gaussian `Omega` that `sketch_seed` and
    `sketch_ranks` rebuild (only the seed travels). `kind` "project": `p_k (Q^T B_k) A_k` (`q x n`) with
    `Q` (`m x q`) the layer's entry of `matrices`. `head`: the dense tensors to add, each times `p_k`.
    """

    kind: StageKind
    weight: float  # p_k
    matrices: Mapping[str, Tensor] | None = None
    sketch_seed: int | None = None
    sketch_ranks: Mapping[str, int] | None = None
    head: tuple[str, ...] = ()
    orthonormal: bool = False  # the seeded sketch orthonormalised (QR), as distributed DP needs
    # Distributed DP (`StagePrivacy`): clip the change (what the client was sent, subtracted) to this
    # L2 norm, scale it by `weight`, and add Gaussian noise of standard deviation `noise_std` to every
    # entry, drawn from `noise_seed` (None: the client's own OS randomness). None: the plain contribution.
    clip: float | None = None
    noise_std: float = 0.0
    noise_seed: int | None = None

    def operands(self, cols: Mapping[str, int]) -> dict[str, Tensor]:
        """The matrix of each adapted weight (`cols`: its `n`, for a seeded sketch)."""
        if self.matrices is not None:
            return dict(self.matrices)
        if self.kind != "sketch" or self.sketch_seed is None or self.sketch_ranks is None:
            raise ValueError("a stage request needs matrices, or a sketch seed with its ranks")
        omega = sketch_matrices(
            self.sketch_seed, {layer: cols[layer] for layer in self.sketch_ranks}, self.sketch_ranks
        )
        return {layer: orthonormal_basis(M) for layer, M in omega.items()} if self.orthonormal else omega

    def downlink_bytes(self) -> int:
        """Bytes the request carries: `p_k`, and the matrices or the seed (8 bytes) with a rank per weight;
        under DP, the clip, the noise's scale and its seed."""
        if self.matrices is not None:
            sent = sum(t.numel() for t in self.matrices.values()) * FLOAT_BYTES
        else:
            sent = 8 + 4 * len(self.sketch_ranks or {})
        private = 3 * FLOAT_BYTES if self.clip is not None else 0
        return FLOAT_BYTES + sent + private


def sketch_matrices(seed: int, cols: Mapping[str, int], ranks: Mapping[str, int]) -> dict[str, Tensor]:
    """The seeded Gaussian sketch of each adapted weight, `n x q` float64, in the order of `cols`: the
    i-th weight's from `numpy.random.default_rng([seed, i])`, so that every party builds the same ones."""
    return {
        layer: torch.from_numpy(np.random.default_rng([seed, i]).standard_normal((n, ranks[layer])))
        for i, (layer, n) in enumerate(cols.items())
    }


def respond(adapter: AdapterWeights, request: StageRequest) -> np.ndarray:
    """One client's contribution to a secure sum, from its own trained adapter, as one flat float64
    vector: the weights' blocks in the order of the request's matrices (row-major), then the head's
    tensors in the order of `request.head`. Runs on the client: the adapter never leaves it."""
    if request.clip is not None:
        raise ValueError("a private stage request: the client clips and noises its change first")
    cols = {layer: f.A.shape[1] for layer, f in adapter.factors.items()}
    p = float(request.weight)
    parts = []
    for layer, M in request.operands(cols).items():
        f = adapter.factors[layer]
        B, A, M = f.B.to(DTYPE), f.A.to(DTYPE), M.to(DTYPE)
        parts.append(p * (B @ (A @ M)) if request.kind == "sketch" else p * ((M.T @ B) @ A))
    parts += [p * adapter.dense[name].to(DTYPE) for name in request.head]
    return torch.cat([t.reshape(-1) for t in parts]).numpy()


# The server's side.


def unpack(total: np.ndarray, layout: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Cut a secure sum back into its blocks (`layout`: name -> shape, in the order `respond` packs).
    Raises ValueError where the lengths differ."""
    sizes = [math.prod(shape) for shape in layout.values()]
    if total.ndim != 1 or total.size != sum(sizes):
        raise ValueError(f"a secure sum of {total.size} numbers, the stage expects {sum(sizes)}")
    flat = torch.from_numpy(np.asarray(total, dtype=np.float64))
    out, start = {}, 0
    for (name, shape), size in zip(layout.items(), sizes, strict=True):
        out[name] = flat[start : start + size].reshape(shape).clone()
        start += size
    return out


def orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis `Q` (`m x q`) of a secure sum `Y` (`m x q`, `q <= m`): reduced QR. Its span
    holds `range(Y)` whatever `Y`'s rank."""
    return torch.linalg.qr(Y.to(DTYPE), mode="reduced").Q


def refactor(Z: Tensor, Q: Tensor, rank: int, split: Split, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """The global factors from the last sum `Z = Q^T dW` (`q x n`) and the basis `Q` (`m x q`): with
    `Z = U_z S V^T`, `B = Q U_z sqrt(S)`, `A = sqrt(S) V^T` ("balanced") or `B = Q U_z S`, `A = V^T`
    ("into_b"), the first `rank` components, float64, zero beyond `min(q, n)`.

    A component whose singular value is at round-off (`S[0] max(m, n, q) eps`) or below `floor` (the
    summation's noise: fixed point) is zero in both factors, as HLoRA's are, so that the method's dead
    components are revived from the init rather than left at noise. Each column of `B` is signed so
    that its largest-magnitude entry is positive, as `aggregate_products` does."""
    U_z, S, Vh = torch.linalg.svd(Z.to(DTYPE), full_matrices=False)
    U = Q.to(DTYPE) @ U_z
    m, n, q = U.shape[0], Vh.shape[1], Q.shape[1]
    tol = max(float(S[0]) * max(m, n, q) * torch.finfo(DTYPE).eps, floor) if S.numel() else floor
    keep = tol < S
    S = torch.where(keep, S, torch.zeros_like(S))
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    U, Vh = U * signs, Vh * signs[:, None]
    k = min(rank, S.numel())
    U, S, Vh, keep = U[:, :k], S[:k], Vh[:k], keep[:k]
    if split == "balanced":
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
    else:
        B, A = U * S, Vh * keep[:, None].to(DTYPE)
    if k < rank:
        B = torch.cat([B, B.new_zeros(m, rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, n)], dim=0)
    return B, A


Exchange = Callable[[Mapping[int, StageRequest]], SecureSumResult]


@dataclass(frozen=True)
class StagePrivacy:
    """Distributed DP on the secure sums: what every stage request carries, and the server's own part.

    `clip`: `C`; `weight`: the fixed weight `1 / m` of every client's clipped change; `share_std`: the
    standard deviation of each client's share of the noise (`sigma / sqrt(t)`, so that any `t` surviving
    shares add up to at least `sigma`); `noise_seed(client, stage)`: the seed of that client's share in
    that sum (None: the client draws from its OS); `public(request)`: the server's contribution in the
    clear to the sum that `request` (weight ignored) asks for, the mean of what the round's sample was
    sent, `sum_S (1/|S|) B0_k A0_k` through the same map."""

    clip: float
    weight: float
    share_std: float
    noise_seed: Callable[[int, int], int | None]
    public: Callable[[StageRequest], np.ndarray]


@dataclass
class TwoStageResult:
    """A secure round's outcome on the server: the global factors (float64, at the bank rank) and head
    of the stage-2 survivors' renormalised mean, and what the round cost and saw."""

    factors: dict[str, tuple[Tensor, Tensor]]
    head: dict[str, Tensor]
    survivors: tuple[int, ...]  # the clients whose contribution is in the result (stage 2's survivors)
    stage_clients: list[tuple[int, ...]]  # the survivors of each secure sum, in order
    sketch_ranks: dict[str, int]  # q of each adapted weight
    tail_energy: float | None  # the share of `||Z||_F^2` beyond the bank rank, pooled over the weights
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    server_views: list[Any] = field(default_factory=list)  # each summation's `server_view`, in order


def sketch_ranks_for(shapes: Mapping[str, tuple[int, int]], sketch_rank: int) -> dict[str, int]:
    """`q` of each adapted weight (`m x n`): `sketch_rank`, never above `min(m, n)`."""
    if sketch_rank < 1:
        raise ValueError(f"the sketch rank must be >= 1, got {sketch_rank}")
    return {layer: min(sketch_rank, m, n) for layer, (m, n) in shapes.items()}


def secure_two_stage(
    exchange: Exchange,
    weights: Mapping[int, float],
    shapes: Mapping[str, tuple[int, int]],
    head: Mapping[str, Sequence[int]],
    rank: int,
    sketch_rank: int,
    seed: int,
    *,
    power_iterations: int = 0,
    split: Split = "balanced",
    resolution: float = 0.0,
    private: StagePrivacy | None = None,
) -> TwoStageResult:
    """The server's side of a secure two-stage round (module docstring): asks the clients of `weights`
    (client id -> `p_k`, summing to 1) for their contributions through `exchange` (the runtime: it
    delivers the requests, gathers the clients' `respond`s and sums them securely), and re-factors the
    sums at `rank`.

    `shapes`: each adapted weight's `(m, n)`, in the global adapter's order; `head`: each dense tensor's
    shape; `sketch_rank`: `q` (clamped per weight to `min(m, n)`); `seed`: `Omega`'s (`sketch_seed`);
    `resolution`: the summation's absolute resolution per entry (`2^-scale_bits`; 0 for exact sums):
    components below the noise it makes are zero. `private`: distributed DP (module docstring; the
    `weights` are then ignored: every client's clipped change has the fixed weight `private.weight`).
    Raises ValueError where a sum cannot be made (too few survivors) or does not fit."""
    ranks = sketch_ranks_for(shapes, sketch_rank)
    alive = tuple(sorted(weights))
    out = TwoStageResult({}, {}, (), [], ranks, None)

    def request(cid: int, kind: StageKind, **kw: Any) -> StageRequest:
        if private is None:
            return StageRequest(kind, weights[cid], **kw)
        stage = len(out.stage_clients)
        return StageRequest(
            kind,
            private.weight,
            orthonormal=True,
            clip=private.clip,
            noise_std=private.share_std,
            noise_seed=private.noise_seed(cid, stage),
            **kw,
        )

    def secure_sum(
        requests: dict[int, StageRequest], layout: dict[str, tuple[int, ...]]
    ) -> dict[str, Tensor]:
        nonlocal alive
        result = exchange(requests)
        for cid, req in requests.items():
            out.bytes_down[cid] = (
                out.bytes_down.get(cid, 0) + req.downlink_bytes() + result.bytes_down.get(cid, 0)
            )
        for cid, sent in result.bytes_up.items():
            out.bytes_up[cid] = out.bytes_up.get(cid, 0) + sent
        out.server_views.append(result.server_view)
        out.stage_clients.append(tuple(result.survivors))
        if not set(result.survivors) <= set(requests):
            raise ValueError(
                f"a secure sum names clients not asked: {sorted(set(result.survivors) - set(requests))}"
            )
        alive = tuple(sorted(result.survivors))
        if not alive:
            raise ValueError("no client survived a secure sum")
        total = result.total
        if private is not None:  # the server's public part, added in the clear
            total = total + private.public(next(iter(requests.values())))
        return unpack(total, layout)

    sketch_layout = {layer: (m, ranks[layer]) for layer, (m, n) in shapes.items()}
    project_layout = {layer: (ranks[layer], n) for layer, (m, n) in shapes.items()}
    Y = secure_sum(
        {cid: request(cid, "sketch", sketch_seed=seed, sketch_ranks=ranks) for cid in alive}, sketch_layout
    )
    Q = {layer: orthonormal_basis(y) for layer, y in Y.items()}
    for _ in range(power_iterations):
        Z = secure_sum({cid: request(cid, "project", matrices=Q) for cid in alive}, project_layout)
        W = {layer: orthonormal_basis(z.T) for layer, z in Z.items()}  # n x q
        Y = secure_sum({cid: request(cid, "sketch", matrices=W) for cid in alive}, sketch_layout)
        Q = {layer: orthonormal_basis(y) for layer, y in Y.items()}
    names = tuple(head)
    sums = secure_sum(
        {cid: request(cid, "project", matrices=Q, head=names) for cid in alive},
        {**project_layout, **{name: tuple(shape) for name, shape in head.items()}},
    )
    # The survivors' weights no longer sum to 1 where a client dropped: their mean, renormalised (under
    # DP the denominator is fixed: a client that dropped contributes no change).
    kept = 1.0 if private is not None else sum(weights[cid] for cid in alive)
    if not kept > 0:
        raise ValueError(f"the surviving clients {list(alive)} have no weight")
    total2 = beyond2 = 0.0
    for layer, (_, n) in shapes.items():
        Z = sums[layer] / kept
        floor = resolution * math.sqrt(len(alive)) * (math.sqrt(ranks[layer]) + math.sqrt(n)) / kept
        out.factors[layer] = refactor(Z, Q[layer], rank, split, floor)
        s2 = torch.linalg.svdvals(Z) ** 2
        total2 += float(s2.sum())
        beyond2 += float(s2[rank:].sum())
    out.head = {name: sums[name] / kept for name in names}
    out.survivors = alive
    out.tail_energy = beyond2 / total2 if total2 > 0 else None
    return out
