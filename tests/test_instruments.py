"""The per-round instruments (`hlora.aggregation.instruments`) against dense references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.aggregation import registry
from hlora.aggregation.instruments import (
    block_labels,
    block_shares,
    effective_rank,
    relative_error,
    round_instruments,
    singular_values,
)
from hlora.aggregation.products import aggregate_products, product_mean, stack_factors, zero_pad_mean
from hlora.federation.server import FederatedServer
from hlora.protocol import ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors


def pairs_of(ranks, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(m, r, generator=g, dtype=torch.float64),
            torch.randn(r, n, generator=g, dtype=torch.float64),
        )
        for r in ranks
    ]


def dense_error(result, pairs, p):
    exact = product_mean(pairs, p).double()
    return float(
        torch.linalg.matrix_norm(result[0].double() @ result[1].double() - exact)
        / torch.linalg.matrix_norm(exact)
    )


FAST = settings(max_examples=30, deadline=None)
shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
rank_lists = st.lists(st.integers(1, 6), min_size=1, max_size=4)


@FAST
@given(shape=shapes, rank=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_singular_values_are_the_dense_products(shape, rank, seed):
    """Any rank, above min(m, n) too: the core's spectrum, padded with zeros, is the product's."""
    ((B, A),) = pairs_of([rank], *shape, seed)
    dense = torch.linalg.svdvals(B @ A)
    ours = singular_values(B, A)
    k = min(dense.numel(), ours.numel())
    torch.testing.assert_close(ours[:k], dense[:k], atol=1e-10, rtol=1e-9)
    assert torch.all(dense[k:] < 1e-10) and torch.all(ours[k:] < 1e-10)


@FAST
@given(ranks=rank_lists, shape=shapes, seed=st.integers(0, 2**16), rank=st.integers(1, 8))
def test_relative_error_matches_the_dense_difference(ranks, shape, seed, rank):
    pairs = pairs_of(ranks, *shape, seed)
    p = torch.linspace(1, 2, len(ranks), dtype=torch.float64)
    p = (p / p.sum()).tolist()
    for result in (aggregate_products(pairs, p, rank), zero_pad_mean(pairs, p, max(max(ranks), rank))):
        assert relative_error(result, pairs, p) == pytest.approx(
            dense_error(result, pairs, p), rel=1e-7, abs=1e-9
        )


@FAST
@given(ranks=rank_lists, seed=st.integers(0, 2**16))
def test_exact_rules_have_no_error_and_truncation_has_eckart_youngs(ranks, seed):
    """Stacking and an HLoRA bank at the total rank keep the exact mean; an HLoRA bank below it loses
    exactly the spectrum's tail: sqrt(sum_{i >= r} s_i^2 / sum s_i^2)."""
    pairs = pairs_of(ranks, 20, 30, seed)
    p = [1 / len(ranks)] * len(ranks)
    total = sum(ranks)
    assert relative_error(stack_factors(pairs, p), pairs, p) < 1e-12
    assert relative_error(aggregate_products(pairs, p, total), pairs, p) < 1e-12
    s = torch.linalg.svdvals(product_mean(pairs, p))
    r = max(1, total // 2)
    tail = math.sqrt(float((s[r:] ** 2).sum() / (s**2).sum()))
    assert relative_error(aggregate_products(pairs, p, r), pairs, p) == pytest.approx(
        tail, rel=1e-8, abs=1e-12
    )


def test_zero_padding_of_mixed_ranks_is_biased_and_a_zero_mean_has_no_relative_error():
    pairs = pairs_of([1, 3], 10, 10, 0)
    assert relative_error(zero_pad_mean(pairs, [0.5, 0.5], 3), pairs, [0.5, 0.5]) > 0.1
    zeros = [(torch.zeros(4, 2), torch.zeros(2, 4))]
    assert relative_error((torch.ones(4, 1), torch.ones(1, 4)), zeros, [1.0]) is None


def test_block_shares_and_labels():
    assert block_labels([2, 4, 8]) == ["0-2", "2-4", "4-8", "8+"]
    s = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0])  # energies 4, 1, 1, 1, 1 of 8
    assert block_shares(s, [1, 3]) == pytest.approx([0.5, 0.25, 0.25])
    assert block_shares(s, [2, 4, 8]) == pytest.approx([5 / 8, 2 / 8, 1 / 8, 0.0])
    assert block_shares(torch.zeros(3), [1, 2]) == [0.0, 0.0, 0.0]


def test_effective_rank():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(2)) is None
    assert 1 < effective_rank(torch.tensor([3.0, 1.0])) < 2


def test_round_instruments_pool_the_adapted_weights():
    ranks = [1, 2, 4]
    layers = {"a": (6, 8), "b": (9, 5)}
    per_layer = {name: pairs_of(ranks, m, n, seed) for seed, (name, (m, n)) in enumerate(layers.items())}
    updates = [{name: LoraFactors(*per_layer[name][k]) for name in layers} for k in range(len(ranks))]
    p = [0.2, 0.3, 0.5]
    result = {name: LoraFactors(*zero_pad_mean(per_layer[name], p, 4)) for name in layers}
    out = round_instruments(result, updates, p, [1, 2, 4], 4)
    errors, exacts = [], []
    for name in layers:
        exact = product_mean(per_layer[name], p)
        errors.append(torch.linalg.matrix_norm(result[name].B @ result[name].A - exact) ** 2)
        exacts.append(torch.linalg.matrix_norm(exact) ** 2)
    assert out["rel_error"] == pytest.approx(math.sqrt(sum(errors) / sum(exacts)), rel=1e-9)
    assert out["exact_norm"] == pytest.approx(math.sqrt(sum(exacts)), rel=1e-9)
    norms = [torch.linalg.matrix_norm(f.B @ f.A) ** 2 for f in result.values()]
    assert out["norm"] == pytest.approx(math.sqrt(sum(norms)), rel=1e-9)
    assert list(out["block_energy"]) == ["0-1", "1-2", "2-4", "4+"]
    assert sum(out["block_energy"].values()) == pytest.approx(1.0)
    assert out["block_energy"]["4+"] == 0.0  # a rank-4 update has no fifth component
    assert len(out["sv_share"]) == 4 and sum(out["sv_share"]) == pytest.approx(1.0)
    assert out["sv_share"] == sorted(out["sv_share"], reverse=True)
    assert 1 <= out["effective_rank"] <= 4


def _server(method: str, ranks: dict[int, int], bank: int = 4) -> FederatedServer:
    init = AdapterWeights({"w": LoraFactors(torch.zeros(6, bank), torch.randn(bank, 5))}, {})
    return FederatedServer(registry.create(method, bank), init, ranks, len(ranks), seed=0)


@pytest.mark.parametrize(("method", "exact"), [("hlora", True), ("flora", True), ("zeropad", False)])
def test_the_server_records_each_rounds_instruments(method, exact):
    """Against the exact mean of the accepted updates: HLoRA within the bank (total rank 3 <= 4) and
    FLoRA's stack keep it, zero-padding does not; FLoRA is measured on its stack, not its fresh adapter."""
    server = _server(method, {0: 1, 1: 2})
    plans = server.configure(1)
    updates = []
    for cid, plan in plans.items():
        f = plan.adapter.factors["w"]
        g = torch.Generator().manual_seed(cid)
        trained = LoraFactors(torch.randn(f.B.shape, generator=g), f.A + torch.randn(f.A.shape, generator=g))
        updates.append(ClientUpdate(cid, 10, AdapterWeights({"w": trained}, {})))
    outcome = server.aggregate(1, updates)
    figures = outcome.instruments
    assert not outcome.failed and figures is not None and outcome.instruments_s >= 0
    assert (figures["rel_error"] < 1e-6) is exact
    assert list(figures["block_energy"]) == ["0-1", "1-2", "2+"]
    assert figures["norm"] > 0


def test_a_failed_round_has_no_instruments():
    server = _server("hlora", {0: 1, 1: 2})
    server.min_clients = 2
    plans = server.configure(1)
    cid, plan = next(iter(plans.items()))
    outcome = server.aggregate(1, [ClientUpdate(cid, 10, plan.adapter)])
    assert outcome.failed and outcome.instruments is None


def test_figures_that_overflow_are_recorded_as_none_not_nan():
    """Finite float64 updates near the limit pass validation without a norm bound and aggregate to a finite
    adapter, but their squared norms overflow: those figures are null, so metrics.jsonl stays strict JSON."""
    init = AdapterWeights(
        {"w": LoraFactors(torch.zeros(6, 2, dtype=torch.float64), torch.ones(2, 5).double())}
    )
    server = FederatedServer(
        registry.create("zeropad", 2), init, {0: 2}, 1, seed=0, update_norm_factor=math.inf
    )
    plan = server.configure(1)[0]
    f = plan.adapter.factors["w"]
    weights = AdapterWeights({"w": LoraFactors(torch.full(f.B.shape, 1e160, dtype=torch.float64), f.A)})
    outcome = server.aggregate(1, [ClientUpdate(0, 10, weights)])
    assert not outcome.failed
    figures = outcome.instruments
    assert figures["norm"] is None and figures["exact_norm"] is None
    assert figures["block_energy"] is not None  # shares are ratios of the spectrum: still finite
    json.dumps(figures, allow_nan=False)
