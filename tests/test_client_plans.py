"""What methods ask of clients through `ClientPlan`: FLoRA's merged stacks and fresh adapters, FFA-LoRA's
frozen shared `A`, the tensors that travel, and components revived from the init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlora.aggregation import registry
from hlora.aggregation.base import revive_components
from hlora.aggregation.products import product_mean
from hlora.client.client import apply_plan
from hlora.config import LoraSettings, TrainSettings
from hlora.federation.server import FederatedServer, traffic
from hlora.models.lora_model import LoraModel
from hlora.protocol import BaseDelta, ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors
from tests.conftest import tiny_bert

LAYER = "layer.query"
X = {"input_ids": torch.tensor([[1, 5, 7, 2, 9, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


def adapter(rank: int, m: int = 6, n: int = 5, seed: int = 0, zero_b: bool = False) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    B = torch.zeros(m, rank, dtype=torch.float64) if zero_b else torch.randn(m, rank, generator=g).double()
    A = torch.randn(rank, n, generator=g, dtype=torch.float64)
    return AdapterWeights({LAYER: LoraFactors(B, A)}, {"classifier.bias": torch.full((2,), float(seed))})


def updates_for(plans: dict[int, ClientPlan], sizes: dict[int, int], seed: int) -> list[ClientUpdate]:
    """Each client's 'training': a random B, and A changed too unless the plan freezes it."""
    out = []
    for cid, plan in plans.items():
        f = plan.adapter.factors[LAYER]
        g = torch.Generator().manual_seed(seed * 100 + cid)
        B = torch.randn(f.B.shape, generator=g, dtype=torch.float64)
        A = f.A if not plan.train_a else f.A + torch.randn(f.A.shape, generator=g, dtype=torch.float64)
        head = {"classifier.bias": torch.full((2,), float(cid))}
        out.append(ClientUpdate(cid, sizes[cid], AdapterWeights({LAYER: LoraFactors(B, A)}, head)))
    return out


def server(method: str, ranks: dict[int, int], per_round: int | None = None) -> FederatedServer:
    agg = registry.create(method, bank_rank=max(ranks.values()))
    init = adapter(max(ranks.values()), seed=7, zero_b=True)
    return FederatedServer(agg, init, ranks, clients_per_round=per_round or len(ranks), seed=0)


# --- FFA-LoRA -------------------------------------------------------------------------------------------


def test_ffa_is_exact_and_keeps_the_shared_a():
    ranks, sizes = {0: 1, 1: 2, 2: 4}, {0: 10, 1: 30, 2: 60}
    srv = server("ffa", ranks)
    shared = srv.global_weights.factors[LAYER].A.clone()
    plans = srv.configure(1)
    assert all(not p.train_a for p in plans.values())
    assert all(torch.equal(p.adapter.factors[LAYER].A, shared[: ranks[c]]) for c, p in plans.items())
    updates = updates_for(plans, sizes, seed=1)
    srv.aggregate(1, updates)
    g = srv.global_weights.factors[LAYER]
    assert torch.equal(g.A, shared)
    used = [(u.weights.factors[LAYER].B, shared[: ranks[u.client_id]]) for u in updates]
    exact = product_mean(used, [1, 3, 6])
    torch.testing.assert_close(g.B @ g.A, exact, rtol=1e-12, atol=1e-12)


def test_ffa_sends_b_and_the_head_only():
    srv = server("ffa", {0: 2, 1: 4})
    plans = srv.configure(1)
    sent = traffic(plans, updates_for(plans, {0: 1, 1: 1}, seed=0))
    for cid, r in {0: 2, 1: 4}.items():
        # B is 6 x r float64, the head 2 float32; A never travels
        assert sent.downlink_bytes_by_client[cid] == 6 * r * 8 + 2 * 4
        assert sent.uplink_bytes_by_client[cid] == 6 * r * 8 + 2 * 4
    assert not any(k.endswith(".lora_A") for k in plans[0].downlink())


# --- FLoRA ----------------------------------------------------------------------------------------------


def test_flora_stacks_exactly_and_clients_restart_fresh():
    ranks, sizes = {0: 1, 1: 2, 2: 4}, {0: 10, 1: 30, 2: 60}
    srv = server("flora", ranks)
    init = srv.global_weights
    plans = srv.configure(1)
    assert all(p.fresh and p.merge == () for p in plans.values())
    updates = updates_for(plans, sizes, seed=1)
    srv.aggregate(1, updates)
    (delta,) = srv.aggregator.deltas
    stack = delta.weights.factors[LAYER]
    assert delta.version == 1 and stack.rank == 7  # the total client rank
    trained = [(u.weights.factors[LAYER].B, u.weights.factors[LAYER].A) for u in updates]
    exact = product_mean(trained, [1, 3, 6])
    torch.testing.assert_close(stack.B @ stack.A, exact, rtol=1e-12, atol=1e-12)
    # the next round starts from the fresh init again, on top of the merged stack
    plans = srv.configure(2)
    for cid, plan in plans.items():
        assert torch.equal(plan.adapter.factors[LAYER].A, init.factors[LAYER].A[: ranks[cid]])
        assert torch.count_nonzero(plan.adapter.factors[LAYER].B) == 0
        assert [d.version for d in plan.merge] == [1]
    torch.testing.assert_close(srv.global_weights.dense["classifier.bias"], torch.full((2,), 0.3 + 1.2))


def test_flora_sends_a_client_every_stack_it_missed():
    ranks = {0: 1, 1: 2, 2: 4, 3: 4}
    srv = server("flora", ranks, per_round=2)
    seen: dict[int, int] = {}  # client -> stacks it holds
    for rnd in range(1, 7):
        plans = srv.configure(rnd)
        for cid, plan in plans.items():
            versions = [d.version for d in plan.merge]
            assert versions == list(range(seen.get(cid, 0) + 1, srv.version + 1))
            seen[cid] = srv.version
            down = traffic(plans, []).downlink_bytes_by_client[cid]
            stacks = sum(d.weights.num_bytes() for d in plan.merge)
            assert down == stacks + 2 * 4  # the stacks it lacks and the head; no factors
        srv.aggregate(rnd, updates_for(plans, dict.fromkeys(ranks, 5), seed=rnd))
    # the server's own model holds every stack
    assert [d.version for d in srv.model_plan().merge] == list(range(1, 7))


# --- LoraModel: merging and freezing ---------------------------------------------------------------------


@pytest.fixture
def model() -> LoraModel:
    return LoraModel(tiny_bert(vocab_size=100), LoraSettings(rank=4, scale=2.0), torch.device("cpu"))


def random_factors(template: AdapterWeights, rank: int, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    return AdapterWeights(
        {
            name: LoraFactors(
                torch.randn(f.B.shape[0], rank, generator=g), torch.randn(rank, f.A.shape[1], generator=g)
            )
            for name, f in template.factors.items()
        },
        dict(template.dense),
    )


def test_merging_a_delta_gives_the_same_model_as_loading_it(model):
    init = model.initial_weights(4, seed=0)  # B = 0: the adapter adds nothing
    model.module.eval()  # no dropout
    delta = random_factors(init, 3, seed=1)
    model.load(AdapterWeights(delta.factors, init.dense))
    with torch.no_grad():
        as_adapter = model.module(**X).logits
    apply_plan(model, ClientPlan(init, fresh=True, merge=(BaseDelta(1, AdapterWeights(delta.factors)),)))
    with torch.no_grad():
        merged = model.module(**X).logits
    torch.testing.assert_close(merged, as_adapter, rtol=1e-5, atol=1e-5)
    # asking again (another in-process client) changes nothing; skipping a version is refused
    apply_plan(model, ClientPlan(init, fresh=True, merge=(BaseDelta(1, AdapterWeights(delta.factors)),)))
    with torch.no_grad():
        torch.testing.assert_close(model.module(**X).logits, merged)
    with pytest.raises(ValueError, match="delta 3 arrived before delta 2"):
        model.merge(3, AdapterWeights(delta.factors))


def test_frozen_a_does_not_train(model):
    from hlora.client.trainer import LocalTrainer
    from hlora.data.tokenize import EncodedSplit

    init = model.initial_weights(4, seed=0)
    start = init.truncate(2)
    features = {"input_ids": [[1, 5, 7, 2]] * 8, "attention_mask": [[1, 1, 1, 1]] * 8}
    data = EncodedSplit(features, np.array([0, 1] * 4))

    def collate(rows):
        batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    settings = TrainSettings(lr=0.05, batch_size=4, local_steps=3)
    trainer = LocalTrainer(model, settings, collate, progress=False)
    frozen = trainer.train(start, data, seed=0, train_a=False).weights
    assert len(model.trainable_parameters()) == 4 + 2  # 4 B factors, the head's weight and bias
    for name, f in frozen.factors.items():
        assert torch.equal(f.A, start.factors[name].A)
        assert not torch.equal(f.B, start.factors[name].B)
    free = trainer.train(start, data, seed=0).weights
    assert any(not torch.equal(f.A, start.factors[n].A) for n, f in free.factors.items())


# --- components that aggregation leaves at zero ---------------------------------------------------------


def test_revived_components_keep_the_product():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    A[2:] = 0
    init_A = torch.randn(4, 5, generator=g)
    B2, A2 = revive_components(B, A, init_A)
    torch.testing.assert_close(B2 @ A2, B @ A)
    assert torch.equal(A2[2:], init_A[2:]) and torch.count_nonzero(B2[:, 2:]) == 0
    assert torch.equal(A2[:2], A[:2]) and torch.equal(B2[:, :2], B[:, :2])


@pytest.mark.parametrize("method", ["hlora", "flexlora", "zeropad"])
def test_components_above_the_rounds_rank_stay_trainable(method):
    # one rank-1 client reports, the bank holds 4 components: 3 would be zero in both factors for good
    srv = server(method, {0: 1, 1: 4}, per_round=1)
    rnd = next(r for r in range(1, 50) if srv.sample(r) == [0])
    plans = srv.configure(rnd)
    srv.aggregate(rnd, updates_for(plans, {0: 5}, seed=0))
    g = srv.global_weights.factors[LAYER]
    init_A = srv.aggregator.initial.factors[LAYER].A
    assert torch.equal(g.A[1:], init_A[1:]) and torch.count_nonzero(g.B[:, 1:]) == 0
    assert torch.count_nonzero(g.A[0]) > 0
