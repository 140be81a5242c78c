"""Properties of the aggregation math in `hlora.aggregation.products` (METHOD.md rules 1-5).

Client factors are random Gaussian `B_k` (m x r_k) and `A_k` (r_k x n) in float64 from a seed that
hypothesis draws, so the checks can use tight tolerances; one test covers float32 in, float32 out.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from unittest import mock

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from hlora.aggregation import products
from hlora.aggregation.products import (
    aggregate_products,
    dense_product_svd,
    factor_mean,
    normalise_weights,
    product_mean,
    stack_factors,
    zero_pad_mean,
)

FAST = settings(max_examples=30, deadline=None)
MAX_DIM = 40
MAX_RANK = 8


class Clients(NamedTuple):
    m: int
    n: int
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    weights: list[float]

    @property
    def ranks(self) -> list[int]:
        return [B.shape[1] for B, _ in self.factors]

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def tol(self) -> float:
        """Absolute tolerance for float64 results: round-off relative to the size of the updates."""
        p = normalise_weights(self.weights, len(self.weights))
        scale = sum(float(w) * B.norm() * A.norm() for w, (B, A) in zip(p, self.factors, strict=True))
        return 1e-9 * (1.0 + float(scale))


@st.composite
def clients(draw, dims: str = "any", equal_ranks: bool = False, max_clients: int = 6) -> Clients:
    """Random clients. `dims`: "any"; "fit" (min(m, n) >= R); "wide" (min(m, n) > R, HLoRA's QR path);
    "narrow" (min(m, n) <= R, the dense fallback)."""
    if dims == "fit":
        max_clients = min(max_clients, MAX_DIM // MAX_RANK)
    elif dims == "wide":
        max_clients = min(max_clients, (MAX_DIM - 1) // MAX_RANK)
    k = draw(st.integers(1, max_clients))
    if equal_ranks:
        ranks = [draw(st.integers(1, MAX_RANK))] * k
    else:
        ranks = draw(st.lists(st.integers(1, MAX_RANK), min_size=k, max_size=k))
    total = sum(ranks)
    if dims == "fit":
        m, n = draw(st.integers(total, MAX_DIM)), draw(st.integers(total, MAX_DIM))
    elif dims == "wide":
        m, n = draw(st.integers(total + 1, MAX_DIM)), draw(st.integers(total + 1, MAX_DIM))
    elif dims == "narrow":
        m, n = draw(st.integers(1, min(total, MAX_DIM))), draw(st.integers(1, MAX_DIM))
        if draw(st.booleans()):
            m, n = n, m
    else:
        m, n = draw(st.integers(1, MAX_DIM)), draw(st.integers(1, MAX_DIM))
    return draw_factors(draw, m, n, ranks)


def draw_factors(draw, m: int, n: int, ranks: list[int], cls: type[Clients] = Clients) -> Clients:
    """Random float64 factors of the given ranks for an `m x n` weight, and weights in [0.05, 10]."""
    weights = draw(st.lists(st.floats(0.05, 10.0), min_size=len(ranks), max_size=len(ranks)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    factors = [
        (
            torch.randn(m, r, generator=g, dtype=torch.float64),
            torch.randn(r, n, generator=g, dtype=torch.float64),
        )
        for r in ranks
    ]
    note(f"m={m} n={n} ranks={ranks} weights={weights}")
    return cls(m, n, factors, weights)


def frob(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x))


def tail(s: torch.Tensor, r: int) -> float:
    """Frobenius error of the best rank-r approximation: sqrt of the sum of the discarded s_j^2."""
    return float(s[r:].square().sum().sqrt())


# --- HLoRA (rule 3) --------------------------------------------------------------------------------------


@FAST
@given(c=clients(dims="fit"), extra=st.integers(0, 3))
def test_hlora_is_exact_when_the_bank_holds_every_component(c: Clients, extra: int) -> None:
    # R = sum r_k <= min(m, n) and rank >= R: nothing has to be cut away.
    rank = c.total_rank + extra
    B, A = aggregate_products(c.factors, c.weights, rank)
    assert (B @ A - product_mean(c.factors, c.weights)).abs().max() <= c.tol


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK))
def test_hlora_truncation_error_is_the_discarded_singular_values(c: Clients, rank: int) -> None:
    dW = product_mean(c.factors, c.weights)
    s = torch.linalg.svdvals(dW)
    B, A = aggregate_products(c.factors, c.weights, rank)
    assert frob(dW - B @ A) == pytest.approx(tail(s, rank), abs=c.tol)


@FAST
@given(c=clients())
def test_hlora_is_never_worse_than_zero_padding(c: Clients) -> None:
    rank = max(c.ranks)
    dW = product_mean(c.factors, c.weights)
    B, A = aggregate_products(c.factors, c.weights, rank)
    Bz, Az = zero_pad_mean(c.factors, c.weights, rank)
    assert frob(dW - B @ A) <= frob(dW - Bz @ Az) + c.tol


@FAST
@given(c=clients(equal_ranks=True))
def test_hlora_is_never_worse_than_fedit(c: Clients) -> None:
    rank = c.ranks[0]
    dW = product_mean(c.factors, c.weights)
    B, A = aggregate_products(c.factors, c.weights, rank)
    Bf, Af = factor_mean(c.factors, c.weights)
    assert frob(dW - B @ A) <= frob(dW - Bf @ Af) + c.tol


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK))
def test_every_prefix_is_the_best_approximation_of_its_rank(c: Clients, rank: int) -> None:
    # What a client of rank r receives, B[:, :r] @ A[:r], is the Eckart-Young optimum at r.
    dW = product_mean(c.factors, c.weights)
    s = torch.linalg.svdvals(dW)
    B, A = aggregate_products(c.factors, c.weights, rank)
    for r in range(1, rank + 1):
        assert frob(dW - B[:, :r] @ A[:r]) == pytest.approx(tail(s, r), abs=c.tol), f"prefix rank {r}"


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK))
def test_split_is_balanced_with_square_roots_of_singular_values(c: Clients, rank: int) -> None:
    s = torch.linalg.svdvals(product_mean(c.factors, c.weights))
    expected = torch.zeros(rank, dtype=torch.float64)  # S, zero beyond the components dW has
    q = min(rank, s.numel())
    expected[:q] = s[:q]
    B, A = aggregate_products(c.factors, c.weights, rank)
    col_norms, row_norms = B.norm(dim=0), A.norm(dim=1)
    assert torch.allclose(col_norms, row_norms, rtol=1e-9, atol=1e-9)
    # ||B[:, j]|| = ||A[j]|| = sqrt(s_j), compared squared: sqrt would blow round-off up.
    assert torch.allclose(col_norms.square(), expected, rtol=0, atol=c.tol)
    assert (col_norms[:-1] >= col_norms[1:] - 1e-9).all()  # descending


@FAST
@given(c=clients(dims="wide"), rank=st.integers(1, MAX_RANK))
def test_qr_path_matches_flexlora_dense_path(c: Clients, rank: int) -> None:
    assert c.total_rank < min(c.m, c.n)
    B, A = aggregate_products(c.factors, c.weights, rank)
    Bf, Af = dense_product_svd(c.factors, c.weights, rank)
    assert (B @ A - Bf @ Af).abs().max() <= c.tol


@FAST
@given(c=clients(dims="narrow"), rank=st.integers(1, MAX_RANK))
def test_dense_fallback_matches_flexlora_dense_path(c: Clients, rank: int) -> None:
    assert c.total_rank >= min(c.m, c.n)
    B, A = aggregate_products(c.factors, c.weights, rank)
    Bf, Af = dense_product_svd(c.factors, c.weights, rank)
    assert (B @ A - Bf @ Af).abs().max() <= c.tol


def test_main_path_never_builds_the_dense_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(300, r, generator=g), torch.randn(r, 200, generator=g)) for r in (2, 4, 8)]
    with mock.patch.object(products, "_dense_mean", side_effect=AssertionError("built dense dW")):
        B, A = aggregate_products(factors, [1.0, 2.0, 3.0], rank=8)
    assert B.shape == (300, 8) and A.shape == (8, 200)


def test_dense_fallback_is_taken_when_total_rank_reaches_min_dim() -> None:
    g = torch.Generator().manual_seed(0)
    # R = 6 >= min(m, n) = 5
    factors = [(torch.randn(5, 3, generator=g), torch.randn(3, 30, generator=g)) for _ in range(2)]
    with mock.patch.object(products, "_dense_mean", wraps=products._dense_mean) as dense:
        aggregate_products(factors, [1.0, 1.0], rank=4)
    assert dense.call_count == 1


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK), data=st.data())
def test_result_does_not_depend_on_client_order(c: Clients, rank: int, data: st.DataObject) -> None:
    order = data.draw(st.permutations(range(len(c.factors))), label="order")
    factors = [c.factors[i] for i in order]
    weights = [c.weights[i] for i in order]
    for method in (aggregate_products, dense_product_svd):
        B, A = method(c.factors, c.weights, rank)
        Bp, Ap = method(factors, weights, rank)
        # Factors, not just their product: the sign convention fixes each singular pair.
        assert torch.allclose(B, Bp, rtol=0, atol=1e-7), method.__name__
        assert torch.allclose(A, Ap, rtol=0, atol=1e-7), method.__name__


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK), factor=st.floats(0.01, 100.0))
def test_unnormalised_weights_give_the_normalised_result(c: Clients, rank: int, factor: float) -> None:
    total = sum(c.weights)
    normalised = [w / total for w in c.weights]
    scaled = [w * factor for w in c.weights]
    for method in (aggregate_products, dense_product_svd, zero_pad_mean):
        B, A = method(c.factors, normalised, max(rank, *c.ranks))
        Bs, As = method(c.factors, torch.tensor(scaled, dtype=torch.float64), max(rank, *c.ranks))
        assert torch.allclose(B, Bs, atol=1e-9) and torch.allclose(A, As, atol=1e-9), method.__name__
    assert torch.allclose(product_mean(c.factors, normalised), product_mean(c.factors, scaled), atol=c.tol)


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK + 10))
def test_output_shapes_are_exactly_the_bank_rank(c: Clients, rank: int) -> None:
    # Also when rank exceeds min(R, m, n), the components dW can have: the rest is zero.
    available = min(c.total_rank, c.m, c.n)
    for method in (aggregate_products, dense_product_svd):
        B, A = method(c.factors, c.weights, rank)
        assert B.shape == (c.m, rank) and A.shape == (rank, c.n), method.__name__
        if rank > available:
            assert not B[:, available:].any() and not A[available:].any(), method.__name__


def test_float32_factors_give_float32_results_close_to_float64() -> None:
    g = torch.Generator().manual_seed(1)
    f64 = [(torch.randn(30, r, generator=g, dtype=torch.float64), torch.randn(r, 20, generator=g,
            dtype=torch.float64)) for r in (2, 3, 5)]
    f32 = [(B.float(), A.float()) for B, A in f64]
    w = [3.0, 1.0, 2.0]
    for method in (aggregate_products, dense_product_svd, zero_pad_mean):
        B, A = method(f32, w, 6)
        B64, A64 = method(f64, w, 6)
        assert B.dtype == A.dtype == torch.float32, method.__name__
        assert torch.allclose(B.double(), B64, atol=1e-4) and torch.allclose(A.double(), A64, atol=1e-4)
    assert product_mean(f32, w).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in stack_factors(f32, w))


# --- the other rules --------------------------------------------------------------------------------------


@FAST
@given(c=clients())
def test_flora_stack_is_the_exact_mean_with_rank_sum_of_ranks(c: Clients) -> None:
    Bs, As = stack_factors(c.factors, c.weights)
    assert Bs.shape == (c.m, c.total_rank) and As.shape == (c.total_rank, c.n)
    assert (Bs @ As - product_mean(c.factors, c.weights)).abs().max() <= c.tol


@FAST
@given(c=clients(), extra=st.integers(0, 3))
def test_zero_padding_averages_the_padded_factors(c: Clients, extra: int) -> None:
    rank = max(c.ranks) + extra
    B, A = zero_pad_mean(c.factors, c.weights, rank)
    assert B.shape == (c.m, rank) and A.shape == (rank, c.n)
    p = normalise_weights(c.weights, len(c.weights))
    for j in range(rank):
        holders = [(w, Bk, Ak) for w, (Bk, Ak) in zip(p, c.factors, strict=True) if Bk.shape[1] > j]
        expected_b = sum((w * Bk[:, j] for w, Bk, _ in holders), torch.zeros(c.m, dtype=torch.float64))
        expected_a = sum((w * Ak[j] for w, _, Ak in holders), torch.zeros(c.n, dtype=torch.float64))
        assert torch.allclose(B[:, j], expected_b) and torch.allclose(A[j], expected_a)


@FAST
@given(c=clients(equal_ranks=True))
def test_fedit_equals_zero_padding_at_equal_ranks(c: Clients) -> None:
    B, A = factor_mean(c.factors, c.weights)
    Bz, Az = zero_pad_mean(c.factors, c.weights, c.ranks[0])
    assert torch.allclose(B, Bz) and torch.allclose(A, Az)


# --- a hand-computed example ------------------------------------------------------------------------------


def test_two_rank_one_clients_by_hand() -> None:
    e = torch.eye(3, dtype=torch.float64)
    client_1 = (e[:, :1], e[:1])  # B_1 A_1 = E_11
    client_2 = (2 * e[:, 1:2], e[1:2])  # B_2 A_2 = 2 E_22
    factors, p = [client_1, client_2], [0.5, 0.5]
    dW = torch.diag(torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(product_mean(factors, p), dW)

    # HLoRA, R = 2 < 3 (QR path): singular values (1, 0.5), split as square roots.
    B, A = aggregate_products(factors, p, rank=2)
    r = math.sqrt(0.5)
    assert torch.allclose(B, torch.tensor([[0.0, r], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(A, torch.tensor([[0.0, 1.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64))
    # A rank-1 client keeps the larger component; what it misses is the other, 0.5.
    assert frob(dW - B[:, :1] @ A[:1]) == pytest.approx(0.5)
    # Bank rank 4 > 2 components: two zero components.
    B4, A4 = aggregate_products(factors, p, rank=4)
    assert torch.allclose(B4[:, :2], B) and not B4[:, 2:].any() and not A4[2:].any()

    # FlexLoRA: singular values in B, orthonormal rows in A.
    Bf, Af = dense_product_svd(factors, p, rank=2)
    assert torch.allclose(Bf, torch.tensor([[0.0, 0.5], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(Af, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))

    # FedIT (= zero-padding at rank 1): B = (0.5, 1, 0)^T, A = (0.5, 0.5, 0), a biased product.
    Bi, Ai = factor_mean(factors, p)
    assert torch.allclose(Bi.flatten(), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(Ai.flatten(), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert frob(dW - Bi @ Ai) > 0.5

    # FLoRA: the stack is exact.
    Bs, As = stack_factors(factors, p)
    assert torch.equal(Bs @ As, dW)


def test_dependent_updates_leave_no_round_off_directions() -> None:
    # Two clients with the same direction: dW has rank 1, so the second component is exactly zero.
    b, a = torch.tensor([[1.0], [2.0], [2.0], [0.0]]), torch.tensor([[3.0, 0.0, 4.0, 0.0, 0.0]])
    B, A = aggregate_products([(b, a), (2 * b, a)], [1.0, 1.0], rank=2)
    assert not B[:, 1].any() and not A[1].any()
    assert torch.allclose(B @ A, 1.5 * b @ a)


# --- validation -------------------------------------------------------------------------------------------

WITH_RANK = [aggregate_products, dense_product_svd, zero_pad_mean]
WITHOUT_RANK = [factor_mean, stack_factors, product_mean]


def call(method, factors, weights, rank: int = 4):
    return method(factors, weights, rank) if method in WITH_RANK else method(factors, weights)


def pair(m: int, r: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(m, r), torch.ones(r, n)


@pytest.mark.parametrize("method", WITH_RANK + WITHOUT_RANK, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("factors", "weights", "message"),
    [
        ([], [], "no client factors"),
        ([(torch.ones(5, 2), torch.ones(3, 4))], [1.0], "inner ranks differ"),
        ([pair(5, 2, 4), pair(6, 2, 4)], [1.0, 1.0], "weight"),  # different m
        ([pair(5, 2, 4), pair(5, 2, 7)], [1.0, 1.0], "weight"),  # different n
        ([(torch.ones(5), torch.ones(1, 4))], [1.0], "2-D"),
        ([pair(5, 2, 4)], [1.0, 1.0], "2 weights for 1 clients"),
        ([pair(5, 2, 4), pair(5, 2, 4)], [1.0, -1.0], "non-negative"),
        ([pair(5, 2, 4)], [float("nan")], "finite"),
        ([pair(5, 2, 4), pair(5, 2, 4)], [0.0, 0.0], "positive sum"),
    ],
)
def test_bad_input_raises_value_error(method, factors, weights, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(method, factors, weights)


@pytest.mark.parametrize("method", WITH_RANK, ids=lambda f: f.__name__)
@pytest.mark.parametrize("rank", [0, -1, True, 2.5])
def test_bad_rank_raises(method, rank) -> None:
    with pytest.raises(ValueError, match="rank"):
        method([pair(5, 2, 4)], [1.0], rank)


def test_fedit_refuses_mixed_ranks_and_names_them() -> None:
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]"):
        factor_mean([pair(5, 2, 4), pair(5, 4, 4), pair(5, 2, 4)], [1.0, 1.0, 1.0])


def test_zero_padding_refuses_ranks_above_its_own() -> None:
    with pytest.raises(ValueError, match="rank 3"):
        zero_pad_mean([pair(5, 2, 4), pair(5, 4, 4)], [1.0, 1.0], rank=3)


def test_normalise_weights() -> None:
    w = normalise_weights(torch.tensor([1.0, 3.0]), 2)
    assert w.dtype == torch.float64 and torch.equal(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(normalise_weights([0, 2], 2), torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        normalise_weights([[1.0, 2.0]], 2)


# --- numeric edges ----------------------------------------------------------------------------------------

ALL_METHODS = WITH_RANK + WITHOUT_RANK


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda f: f.__name__)
def test_weights_whose_sum_overflows_give_the_result_of_equal_weights(method) -> None:
    B, A = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    factors = [(B, A), (2 * B, A)]
    huge = call(method, factors, [1e308, 1e308], rank=2)
    equal = call(method, factors, [1.0, 1.0], rank=2)
    if not isinstance(huge, tuple):  # product_mean: one matrix
        huge, equal = (huge,), (equal,)
    for got, want in zip(huge, equal, strict=True):
        assert torch.equal(got, want)


@FAST
@given(c=clients(), rank=st.integers(1, MAX_RANK), scale=st.floats(1e-300, 1.7e307))
def test_any_finite_weights_give_the_result_of_their_ratios(c: Clients, rank: int, scale: float) -> None:
    """Weights multiplied by any positive number that keeps them finite (their sum may overflow, or they
    may be subnormal) give the product mean of the weights themselves."""
    big = [w * scale for w in c.weights]  # each below 1.7e308, their sum possibly not
    p = normalise_weights(c.weights, len(c.weights))
    assert torch.allclose(normalise_weights(big, len(big)), p, rtol=1e-12, atol=0)
    B, A = aggregate_products(c.factors, big, rank)
    B1, A1 = aggregate_products(c.factors, c.weights, rank)
    assert torch.allclose(B @ A, B1 @ A1, atol=c.tol)


def test_normalise_weights_never_overflows() -> None:
    w = normalise_weights([1.7e308, 1.7e308, 0.0], 3)
    assert torch.equal(w, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(normalise_weights([5e-324, 5e-324], 2), torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("dims", [(40, 30), (6, 5)], ids=["qr-path", "dense-path"])
def test_updates_that_cancel_exactly_give_exact_zeros(dims: tuple[int, int]) -> None:
    m, n = dims
    g = torch.Generator().manual_seed(3)
    B = torch.randn(m, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, n, generator=g, dtype=torch.float64)
    for factors in ([(B, A), (-B, A)], [(B, A), (B, -A)], [(B, A), (2 * B, A), (-3 * B, A)]):
        weights = [1.0] * len(factors)
        Bg, Ag = aggregate_products(factors, weights, rank=8)
        assert not Bg.any() and not Ag.any(), float(Bg.abs().max())
        Bf, Af = dense_product_svd(factors, weights, rank=8)
        assert not Bf.any() and not Af.any()


@FAST
@given(c=clients(dims="any", max_clients=3), rank=st.integers(1, MAX_RANK), data=st.data())
def test_cancelled_clients_leave_only_the_others_components(c: Clients, rank: int, data) -> None:
    """Adding a client and its exact negative (equal weights) changes nothing beyond round-off, and
    leaves no component that the other clients do not have: the result's rank is theirs."""
    k = data.draw(st.integers(0, len(c.factors) - 1))
    B, A = c.factors[k]
    w = c.weights[k]
    factors = [*c.factors, (-B, A)]
    weights = [*c.weights, w]
    # (B, A) and (-B, A) cancel: the exact mean is that of the others, scaled by their share of the weight.
    Bg, Ag = aggregate_products(factors, weights, rank)
    dW = product_mean(factors, weights)
    assert torch.allclose(Bg @ Ag, _best(dW, rank), atol=c.tol)
    others = [f for j, f in enumerate(c.factors) if j != k]
    alive = int((Ag.abs().amax(dim=1) > 0).sum())
    assert alive <= min(rank, sum(b.shape[1] for b, _ in others), c.m, c.n)


def _best(dW: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
