"""Rank-block averaging (`rablock`, raFLoRA arXiv 2602.13486): `products.aggregate_rank_blocks` against a
dense reference, its block weights, and what the instruments see of it next to HLoRA.

Client factors are random Gaussian float64 from a seed that hypothesis draws, so tolerances are tight.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.aggregation import registry
from hlora.aggregation.instruments import block_shares, round_instruments, singular_values
from hlora.aggregation.products import (
    aggregate_products,
    aggregate_rank_blocks,
    block_weights,
    normalise_weights,
    rank_blocks,
)
from hlora.weights import AdapterWeights, LoraFactors
from tests.test_products import Clients as ProductClients
from tests.test_products import draw_factors

FAST = settings(max_examples=25, deadline=None, derandomize=True)
MAX_DIM = 40
TIERS = (1, 2, 4, 8, 16)


class Clients(ProductClients):
    """`test_products`' random clients, with the round-off this file's comparisons allow."""

    @property
    def tol(self) -> float:
        """Round-off relative to the size of the updates (every block weight is at most 1)."""
        return 1e-9 * (1.0 + sum(float(B.norm() * A.norm()) for B, A in self.factors))


def make_clients(draw, ranks: list[int]) -> Clients:
    m, n = draw(st.integers(1, MAX_DIM)), draw(st.integers(1, MAX_DIM))
    return draw_factors(draw, m, n, ranks, Clients)


@st.composite
def clients(draw, equal_ranks: bool = False) -> Clients:
    k = draw(st.integers(1, 5))
    if equal_ranks:
        ranks = [draw(st.sampled_from(TIERS))] * k
    else:
        ranks = draw(st.lists(st.sampled_from(TIERS), min_size=k, max_size=k))
    return make_clients(draw, ranks)


def dense_reference(c: Clients) -> torch.Tensor:
    """`sum_b sum_{k: r_k >= end_b} (p_k / sum_{j: r_j >= end_b} p_j) B_k[:, b] @ A_k[b]`, built densely
    block by block, straight from the rule (no shared code with the function under test)."""
    p = normalise_weights(c.weights, len(c.weights))
    edges = sorted(set(c.ranks))
    out = torch.zeros(c.m, c.n, dtype=torch.float64)
    for lo, hi in zip([0, *edges[:-1]], edges, strict=True):
        holders = [k for k, r in enumerate(c.ranks) if r >= hi]
        total = sum(float(p[k]) for k in holders)
        for k in holders:
            B, A = c.factors[k]
            out += float(p[k]) / total * B[:, lo:hi] @ A[lo:hi]
    return out


# --- the rule ------------------------------------------------------------------------------------------


@FAST
@given(c=clients(), extra=st.integers(0, 3))
def test_exact_block_mean_when_the_bank_holds_every_component(c: Clients, extra: int) -> None:
    rank = sum(c.ranks) + extra  # nothing has to be cut away, on the QR path or the dense fallback
    B, A = aggregate_rank_blocks(c.factors, c.weights, rank)
    assert B.shape == (c.m, rank) and A.shape == (rank, c.n)
    assert (B @ A - dense_reference(c)).abs().max() <= c.tol


@FAST
@given(c=clients(), rank=st.integers(1, 16))
def test_truncation_keeps_the_best_rank_r_approximation_of_the_block_mean(c: Clients, rank: int) -> None:
    G = dense_reference(c)
    s = torch.linalg.svdvals(G)
    B, A = aggregate_rank_blocks(c.factors, c.weights, rank)
    discarded = float(s[rank:].square().sum().sqrt())
    assert float(torch.linalg.matrix_norm(G - B @ A)) == pytest.approx(discarded, abs=c.tol)


@FAST
@given(c=clients(equal_ranks=True), rank=st.integers(1, 20))
def test_one_rank_for_all_is_hlora(c: Clients, rank: int) -> None:
    """(1) One rank, one block, `w_k0 = p_k`: the product mean HLoRA re-factors, the same factors."""
    B, A = aggregate_rank_blocks(c.factors, c.weights, rank)
    Bh, Ah = aggregate_products(c.factors, c.weights, rank)
    assert (B @ A - Bh @ Ah).abs().max() <= c.tol
    if sum(c.ranks) < min(c.m, c.n):  # the QR path scales by the same sqrt(p_k): bit for bit
        assert torch.equal(B, Bh) and torch.equal(A, Ah)


@FAST
@given(data=st.data())
def test_the_top_block_is_the_mean_of_its_holders_alone(data) -> None:
    """(2) Only the rank-16 clients hold block 8-16: what that block adds to the update is their own
    weighted mean `sum_{r_k = 16} p_k X_k / sum_{r_k = 16} p_k`, `X_k = B_k[:, 8:16] @ A_k[8:16]`, however
    many low-rank clients there are; HLoRA adds `sum_{r_k = 16} p_k X_k`, diluted by their weights."""
    low = data.draw(st.lists(st.sampled_from((2, 4, 8)), min_size=1, max_size=4))
    high = data.draw(st.integers(1, 3))
    c = make_clients(data.draw, low + [16] * high)
    cut = [
        (B, torch.cat([A[:8], torch.zeros_like(A[8:])])) if B.shape[1] == 16 else (B, A) for B, A in c.factors
    ]  # the same clients without block 8-16
    p = normalise_weights(c.weights, len(c.weights))
    top = [(float(p[k]), B[:, 8:] @ A[8:]) for k, (B, A) in enumerate(c.factors) if B.shape[1] == 16]
    holders_mean = sum(w * X for w, X in top) / sum(w for w, _ in top)
    bank = 64  # >= sum r_k: no truncation
    B, A = aggregate_rank_blocks(c.factors, c.weights, bank)
    Bc, Ac = aggregate_rank_blocks(cut, c.weights, bank)
    assert (B @ A - Bc @ Ac - holders_mean).abs().max() <= c.tol
    Bh, Ah = aggregate_products(c.factors, c.weights, bank)
    Bhc, Ahc = aggregate_products(cut, c.weights, bank)
    diluted = sum(w * X for w, X in top)
    assert (Bh @ Ah - Bhc @ Ahc - diluted).abs().max() <= c.tol


@FAST
@given(
    ranks=st.lists(st.sampled_from(TIERS), min_size=1, max_size=6),
    weights=st.lists(st.floats(0.0, 10.0), min_size=6, max_size=6),
)
def test_block_weights_renormalise_p_over_each_blocks_holders(ranks: list[int], weights: list[float]) -> None:
    weights = weights[: len(ranks)]
    if sum(weights) == 0:
        weights[0] = 1.0
    W = block_weights(ranks, weights)
    blocks = rank_blocks(ranks)
    assert W.shape == (len(ranks), len(blocks))
    assert [hi for _, hi in blocks] == sorted(set(ranks)) and blocks[0][0] == 0
    p = normalise_weights(weights, len(ranks))
    assert torch.equal(W[:, 0], p)  # block 0: every client holds it
    for b, (_, hi) in enumerate(blocks):
        held = torch.tensor([r >= hi for r in ranks])
        assert (W[~held, b] == 0).all()
        total = float(p[held].sum())
        if total > 0:
            assert float(W[:, b].sum()) == pytest.approx(1.0, abs=1e-12)
            assert torch.allclose(W[held, b], p[held] / total, rtol=1e-12, atol=0)
        else:  # its holders all weigh 0: the block adds nothing
            assert (W[:, b] == 0).all()


def test_float32_in_float32_out_and_bad_input_named() -> None:
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(12, r, generator=g), torch.randn(r, 10, generator=g)) for r in (2, 4)]
    B, A = aggregate_rank_blocks(factors, [1.0, 3.0], 4)
    assert B.dtype == A.dtype == torch.float32 and B.shape == (12, 4) and A.shape == (4, 10)
    with pytest.raises(ValueError, match="client 1: inner ranks differ"):
        aggregate_rank_blocks([factors[0], (factors[1][0], factors[1][1][:3])], [1.0, 1.0], 4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        aggregate_rank_blocks(factors, [1.0, 1.0], 0)


# --- what the instruments see ------------------------------------------------------------------------------


def test_instruments_show_energy_kept_in_the_high_blocks() -> None:
    """(3) Three rank-2 clients and one rank-16 client with equal data; every client moves each of its
    components by the same amount along shared orthonormal directions. HLoRA weighs components 2-16 by the
    rank-16 client's p = 1/4, so their share of the energy is 14/16 / (2 + 14/16) = 30%; rank-block
    averaging keeps them at full weight, 14/16 of the energy, as the rank-16 client trained them."""
    m, n, edges = 30, 24, [2, 16]
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(m, 16, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=torch.float64)).Q.T
    ranks = [2, 2, 2, 16]
    updates = [{"w": LoraFactors(U[:, :r].clone(), V[:r].clone())} for r in ranks]
    pairs = [(u["w"].B, u["w"].A) for u in updates]
    p = [0.25] * 4
    hlora = {"w": LoraFactors(*aggregate_products(pairs, p, 16))}
    rablock = {"w": LoraFactors(*aggregate_rank_blocks(pairs, p, 16))}

    hl = round_instruments(hlora, updates, p, edges, 16)["block_energy"]
    rb = round_instruments(rablock, updates, p, edges, 16)["block_energy"]
    assert hl["2-16"] == pytest.approx((14 / 16) / (2 + 14 / 16), abs=1e-9)
    assert rb["2-16"] == pytest.approx(14 / 16, abs=1e-9)
    assert rb["2-16"] > hl["2-16"] and rb["0-2"] < hl["0-2"]
    s = singular_values(rablock["w"].B, rablock["w"].A)
    assert block_shares(s, edges) == pytest.approx([rb["0-2"], rb["2-16"], rb["16+"]], abs=1e-12)


# --- the method ------------------------------------------------------------------------------------------


def test_rablock_is_registered_stateless_and_aggregates_per_layer() -> None:
    cls = registry.get("rablock")
    assert not cls.equal_ranks and cls.order == 6 and cls.Options is None
    agg = registry.create("rablock", bank_rank=8)
    assert agg.state_dict() == {}
    agg.load_state_dict({})
    with pytest.raises(ValueError):
        agg.load_state_dict({"x": 1})
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(9, r, generator=g), torch.randn(r, 7, generator=g)) for r in (2, 8)]
    B, A = agg.combine(pairs, [0.5, 0.5])
    Be, Ae = aggregate_rank_blocks(pairs, [0.5, 0.5], 8)
    assert torch.equal(B, Be) and torch.equal(A, Ae)
    plan = agg.plan_for(AdapterWeights({"w": LoraFactors(B, A)}), 2)
    assert plan.adapter.factors["w"].A.shape == (2, 7)  # the global adapter's first r_k components
