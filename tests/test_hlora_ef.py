"""HLoRA with error feedback (`hlora_ef`): the rule against dense references, its budget and its state.

Each test plays a few rounds of the method on hand-built float64 updates: per round, random client
factors `(B_k, A_k)` of mixed ranks; the references are the dense products `M_t = sum_k p_k B_k @ A_k`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from hlora.aggregation import registry
from hlora.aggregation.products import aggregate_products, product_mean, truncate_products
from hlora.errors import ConfigError
from hlora.protocol import ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors

FEW = settings(max_examples=12, deadline=None, derandomize=True)
LAYERS = ("enc.0.query", "enc.0.value")
BIG = 1000  # a residual budget nothing here reaches


def create(bank_rank: int, **options):
    return registry.create("hlora_ef", bank_rank=bank_rank, options=options or None)


def start(agg, m: int, n: int) -> AdapterWeights:
    """The round-0 global adapter: `B = 0`, a seeded `A` (as the model's fresh LoRA init)."""
    g = torch.Generator().manual_seed(1)
    r = agg.bank_rank
    factors = {
        layer: LoraFactors(
            torch.zeros(m, r, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
        )
        for layer in LAYERS
    }
    return agg.initial_global(AdapterWeights(factors, {"classifier.bias": torch.zeros(2)}))


def round_updates(ranks, m: int, n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, r in enumerate(ranks):
        factors = {
            layer: LoraFactors(
                torch.randn(m, r, generator=g, dtype=torch.float64),
                torch.randn(r, n, generator=g, dtype=torch.float64),
            )
            for layer in LAYERS
        }
        head = {"classifier.bias": torch.full((2,), float(k))}
        updates.append(ClientUpdate(k, 10 * (k + 1) + seed % 7, AdapterWeights(factors, head)))
    return updates


def mean(updates, layer: str) -> torch.Tensor:
    pairs = [(u.weights.factors[layer].B, u.weights.factors[layer].A) for u in updates]
    return product_mean(pairs, [u.num_samples for u in updates])


def dense(f: LoraFactors | None, m: int, n: int) -> torch.Tensor:
    return torch.zeros(m, n, dtype=torch.float64) if f is None else f.B @ f.A


@st.composite
def federations(draw, max_rounds: int = 4):
    """A few rounds of mixed-rank clients on two adapted weights of one `m x n` shape: some wide enough
    for the QR path, some narrow enough for the dense fallback."""
    m, n = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    bank_rank = draw(st.integers(1, 4))
    count = draw(st.integers(2, max_rounds))
    rounds = [draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)) for _ in range(count)]
    return m, n, bank_rank, rounds


@FEW
@given(federations())
def test_rounds_telescope_to_the_sum_of_the_exact_means(fed):
    """With a budget that holds every residual: `G_t + E_t = M_t + E_{t-1}` each round, so
    `sum_t G_t + E_T = sum_t M_t` (dense references)."""
    m, n, bank_rank, rounds = fed
    agg = create(bank_rank, residual_rank=BIG)
    global_weights = start(agg, m, n)
    total_G = {layer: torch.zeros(m, n, dtype=torch.float64) for layer in LAYERS}
    total_M = {layer: torch.zeros(m, n, dtype=torch.float64) for layer in LAYERS}
    for t, ranks in enumerate(rounds):
        updates = round_updates(ranks, m, n, seed=t)
        before = {layer: dense(agg.residual.get(layer), m, n) for layer in LAYERS}
        global_weights = agg.aggregate(global_weights, updates)
        for layer in LAYERS:
            G, M = dense(global_weights.factors[layer], m, n), mean(updates, layer)
            E = dense(agg.residual.get(layer), m, n)
            scale = 1.0 + float(M.norm() + before[layer].norm())
            assert torch.allclose(G + E, M + before[layer], atol=1e-9 * scale, rtol=0)
            total_G[layer] += G
            total_M[layer] += M
    for layer in LAYERS:
        E_T = dense(agg.residual.get(layer), m, n)
        scale = 1.0 + float(total_M[layer].norm())
        assert torch.allclose(total_G[layer] + E_T, total_M[layer], atol=1e-9 * len(rounds) * scale, rtol=0)


@FEW
@given(federations())
def test_residual_rank_zero_is_hlora_bit_for_bit(fed):
    m, n, bank_rank, rounds = fed
    ef, hl = create(bank_rank, residual_rank=0), registry.create("hlora", bank_rank=bank_rank)
    w_ef, w_hl = start(ef, m, n), start(hl, m, n)
    for t, ranks in enumerate(rounds):
        updates = round_updates(ranks, m, n, seed=t)
        w_ef, w_hl = ef.aggregate(w_ef, updates), hl.aggregate(w_hl, updates)
        for name, tensor in w_hl.tensors().items():
            assert torch.equal(w_ef.tensors()[name], tensor), (t, name)
        assert ef.state_dict() == {}


@FEW
@given(federations(max_rounds=2))
def test_the_first_round_is_hlora_bit_for_bit_since_nothing_is_carried_yet(fed):
    m, n, bank_rank, rounds = fed
    ef, hl = create(bank_rank), registry.create("hlora", bank_rank=bank_rank)
    updates = round_updates(rounds[0], m, n, seed=0)
    a, b = ef.aggregate(start(ef, m, n), updates), hl.aggregate(start(hl, m, n), updates)
    assert all(torch.equal(a.tensors()[k], t) for k, t in b.tensors().items())


@FEW
@given(federations(), st.integers(1, 3))
def test_the_budget_bounds_the_residual_and_keeps_its_best_approximation(fed, budget):
    """The residual has at most `residual_rank` components, and they are the best rank-`residual_rank`
    approximation of what the truncation dropped: the error is the spectrum beyond `r_g + budget`."""
    m, n, bank_rank, rounds = fed
    agg = create(bank_rank, residual_rank=budget)
    global_weights = start(agg, m, n)
    for t, ranks in enumerate(rounds):
        updates = round_updates(ranks, m, n, seed=t)
        target = {layer: mean(updates, layer) + dense(agg.residual.get(layer), m, n) for layer in LAYERS}
        global_weights = agg.aggregate(global_weights, updates)
        for layer in LAYERS:
            E = agg.residual.get(layer)
            assert E is None or E.rank <= budget
            lost = target[layer] - dense(global_weights.factors[layer], m, n) - dense(E, m, n)
            s = torch.linalg.svdvals(target[layer])
            dropped = s[bank_rank + budget :].square().sum().sqrt()
            assert abs(float(lost.norm() - dropped)) <= 1e-9 * (1.0 + float(s.sum()))


def test_the_default_budget_is_the_bank_rank_and_a_total_rank_that_fits_leaves_no_residual():
    agg = create(4)
    assert agg.residual_rank == 4
    global_weights = agg.aggregate(start(agg, 12, 10), round_updates([1, 3], 12, 10, seed=0))
    assert agg.residual == {} and agg.state_dict() == {}  # R = 4 fits: nothing dropped
    agg.aggregate(global_weights, round_updates([2, 4, 4], 12, 10, seed=1))  # R = 10 + 0 > 4
    assert {f.rank for f in agg.residual.values()} == {4}


def test_truncate_products_adds_the_carry_with_weight_one():
    g = torch.Generator().manual_seed(3)

    def pair(r):
        f64 = torch.float64
        return torch.randn(9, r, generator=g, dtype=f64), torch.randn(r, 7, generator=g, dtype=f64)

    pairs, carry = [pair(2), pair(1)], pair(2)
    cut = truncate_products(pairs, [3.0, 1.0], 2, carry=carry, tail_rank=BIG)
    X = product_mean(pairs, [3.0, 1.0]) + carry[0] @ carry[1]
    (B, A), (B_E, A_E) = cut
    assert torch.allclose(B @ A + B_E @ A_E, X, atol=1e-12)
    assert B_E.shape[1] == 3  # R = 5 components, 2 kept
    plain, hlora = truncate_products(pairs, [3.0, 1.0], 2).kept, aggregate_products(pairs, [3.0, 1.0], 2)
    assert all(torch.equal(x, y) for x, y in zip(plain, hlora, strict=True))


def test_state_round_trips_through_a_tensor_file_and_resumes_the_same_rounds():
    m, n = 16, 11
    agg = create(2, residual_rank=3)
    global_weights = start(agg, m, n)
    for t in range(2):
        global_weights = agg.aggregate(global_weights, round_updates([2, 3, 4], m, n, seed=t))
    state = agg.state_dict()
    assert state and all(k.startswith("residual.") for k in state)
    restored = create(2, residual_rank=3)
    start(restored, m, n)
    restored.load_state_dict(load(save({k: t.contiguous() for k, t in state.items()})))  # as a checkpoint
    nxt = round_updates([1, 4], m, n, seed=5)
    a, b = agg.aggregate(global_weights, nxt), restored.aggregate(global_weights, nxt)
    assert all(torch.equal(a.tensors()[k], t) for k, t in b.tensors().items())
    assert all(torch.equal(agg.state_dict()[k], t) for k, t in restored.state_dict().items())


def test_load_state_dict_refuses_a_state_it_cannot_have_written():
    agg = create(2, residual_rank=1)
    with pytest.raises(ValueError, match="only its residual"):
        agg.load_state_dict({"deltas": 1})
    key = "residual.enc.0.query"
    wide = {f"{key}.lora_B": torch.zeros(5, 2), f"{key}.lora_A": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="exceeds rank 1"):
        agg.load_state_dict(wide)
    with pytest.raises(ValueError, match="unpaired"):
        agg.load_state_dict({f"{key}.lora_B": torch.zeros(5, 1)})


def test_residual_rank_option_is_validated():
    with pytest.raises(ConfigError, match="residual_rank"):
        create(2, residual_rank=-1)
    with pytest.raises(ConfigError, match="residual_rank"):
        create(2, rank=3)
    assert create(2, residual_rank=0).residual_rank == 0
