"""Fed-PLoRA (arXiv 2602.16936): the seeded Select-N-Fold plans, the fold a client undoes bit for bit,
and the per-module average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.aggregation import registry
from hlora.aggregation.fedplora import module_mean, select_modules, split_modules
from hlora.client.client import FederatedClient, apply_plan
from hlora.client.trainer import LocalTrainer
from hlora.config import LoraSettings, TrainSettings
from hlora.data.tokenize import EncodedSplit
from hlora.flower.wire import decode_plan, encode_plan
from hlora.models.lora_model import LoraModel
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors
from tests.conftest import tiny_bert
from tests.test_client_plans import LAYER, X, adapter, random_factors, server, updates_for


@settings(deadline=None, derandomize=True, max_examples=30)
@given(
    seed=st.integers(0, 2**32 - 1),
    rnd=st.integers(1, 500),
    cid=st.integers(0, 200),
    bank=st.integers(1, 16),
    data=st.data(),
)
def test_selection_is_seeded_and_covers_distinct_modules(seed, rnd, cid, bank, data):
    rank = data.draw(st.integers(1, bank))
    sel = select_modules(seed, rnd, cid, rank, bank)
    assert sel == select_modules(seed, rnd, cid, rank, bank)  # the same for the same run, round, client
    assert len(sel) == rank and len(set(sel)) == rank and sel == sorted(sel)
    assert all(0 <= j < bank for j in sel)


def test_selection_differs_between_rounds_and_clients_and_covers_every_module():
    draws = {tuple(select_modules(0, rnd, cid, 2, 8)) for rnd in range(1, 30) for cid in range(4)}
    assert len(draws) > 10  # a fresh draw per round and client, not one fixed subset
    assert set().union(*draws) == set(range(8))  # in time, every module trains
    counts = np.bincount([j for d in draws for j in d], minlength=8)
    assert counts.min() > 0


def test_plans_split_the_global_adapter_into_trained_and_folded_modules():
    ranks = {0: 1, 1: 2, 2: 4}
    srv = server("fedplora", ranks)
    srv.global_weights = adapter(4, seed=3)  # B != 0: every module matters
    g = srv.global_weights.factors[LAYER]
    plans = srv.configure(5)
    for cid, plan in plans.items():
        sel = select_modules(0, 5, cid, ranks[cid], 4)
        f = plan.adapter.factors[LAYER]
        assert plan.adapter.rank == ranks[cid]
        assert torch.equal(f.B, g.B[:, sel]) and torch.equal(f.A, g.A[sel])
        if ranks[cid] == 4:
            assert plan.fold is None
            continue
        rest = [j for j in range(4) if j not in sel]
        h = plan.fold.factors[LAYER]
        assert torch.equal(h.B, g.B[:, rest]) and torch.equal(h.A, g.A[rest]) and not plan.fold.dense
        # trained and folded modules together are the whole global update: no initialisation noise
        torch.testing.assert_close(f.B @ f.A + h.B @ h.A, g.B @ g.A)
        # the client receives the whole global adapter (its part and the fold); sends back its part
        down, up = plan.downlink(), plan.uplink(plan.adapter)
        assert set(down) == set(up) | {f"fold.{LAYER}.lora_A", f"fold.{LAYER}.lora_B"}
    # the model the server evaluates for any tier is the whole global adapter
    assert srv.model_plan(1).adapter.rank == 4 and srv.model_plan(1).fold is None


def test_aggregate_maps_each_client_back_to_its_modules():
    ranks, sizes = {0: 1, 1: 2, 2: 2, 3: 4}, {0: 10, 1: 30, 2: 20, 3: 40}
    srv = server("fedplora", ranks)
    srv.global_weights = adapter(4, seed=3)
    plans = srv.configure(2)
    updates = updates_for(plans, sizes, seed=1)
    before = srv.global_weights.factors[LAYER]
    srv.aggregate(2, updates)
    after = srv.global_weights.factors[LAYER]
    for j in range(4):
        holders = [
            (u, plans[u.client_id])
            for u in updates
            if j in select_modules(0, 2, u.client_id, ranks[u.client_id], 4)
        ]
        w = torch.tensor([float(sizes[u.client_id]) for u, _ in holders], dtype=torch.float64)
        w = w / w.sum()
        pos = [select_modules(0, 2, u.client_id, ranks[u.client_id], 4).index(j) for u, _ in holders]
        B_j = sum(
            wk * u.weights.factors[LAYER].B[:, i] for wk, (u, _), i in zip(w, holders, pos, strict=True)
        )
        A_j = sum(wk * u.weights.factors[LAYER].A[i] for wk, (u, _), i in zip(w, holders, pos, strict=True))
        torch.testing.assert_close(after.B[:, j], B_j)
        torch.testing.assert_close(after.A[j], A_j)
    assert not torch.equal(after.A, before.A)
    head = sum(sizes[c] * float(c) for c in sizes) / sum(sizes.values())
    torch.testing.assert_close(srv.global_weights.dense["classifier.bias"], torch.full((2,), head))


def test_a_module_nobody_trained_keeps_its_value():
    g = LoraFactors(torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
    clients = [
        LoraFactors(torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64))
    ] * 2
    out = module_mean(g, clients, [[1], [3]], [0.25, 0.75])
    for j in (0, 2):  # nobody trained these: bit for bit as they were
        assert torch.equal(out.B[:, j], g.B[:, j]) and torch.equal(out.A[j], g.A[j])
    torch.testing.assert_close(out.B[:, 1], clients[0].B[:, 0])  # one holder: its own value
    with pytest.raises(ValueError, match="distinct"):
        module_mean(g, clients[:1], [[5]], [1.0])


@settings(deadline=None, derandomize=True, max_examples=20)
@given(seed=st.integers(0, 1000), k=st.integers(1, 4), bank=st.integers(1, 5))
def test_at_full_rank_it_is_the_plain_factor_average(seed, k, bank):
    """Every client at rank R: no fold, each module trained by all, so FedAvg of the factors (FedIT)."""
    g = torch.Generator().manual_seed(seed)
    glob = LoraFactors(torch.randn(6, bank, generator=g), torch.randn(bank, 5, generator=g))
    clients = [
        LoraFactors(torch.randn(6, bank, generator=g), torch.randn(bank, 5, generator=g)) for _ in range(k)
    ]
    p = torch.rand(k, generator=g).add(0.1)
    p = (p / p.sum()).tolist()
    sel = select_modules(seed, 1, 0, bank, bank)
    assert sel == list(range(bank)) and split_modules(AdapterWeights({LAYER: glob}), sel)[1] is None
    out = module_mean(glob, clients, [sel] * k, p)
    fedit = registry.create("fedit", bank_rank=bank).combine([(c.B, c.A) for c in clients], p)
    torch.testing.assert_close(out.B, fedit[0])
    torch.testing.assert_close(out.A, fedit[1])


# --- the fold on a model: applied for training only, undone bit for bit ------------------------------------


@pytest.fixture
def model() -> LoraModel:
    return LoraModel(tiny_bert(vocab_size=100), LoraSettings(rank=4, scale=2.0), torch.device("cpu"))


def _collate(rows):
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return batch


def test_the_fold_trains_on_the_whole_global_model_and_is_undone_bit_for_bit(model):
    init = model.initial_weights(4, seed=0)
    glob = AdapterWeights(random_factors(init, 4, seed=1).factors, init.dense)
    model.module.eval()
    model.load(glob)
    with torch.no_grad():
        whole = model.module(**X).logits
    base = {k: v.clone() for k, v in model.module.state_dict().items() if "lora_" not in k}
    adapter_part, fold = split_modules(glob, [0, 2])
    plan = ClientPlan(adapter_part, fold=fold)
    with model.folded(plan.fold):  # the client's start: its 2 modules over a base holding the other 2
        model.load(plan.adapter)
        with torch.no_grad():
            torch.testing.assert_close(model.module(**X).logits, whole, rtol=1e-5, atol=1e-5)
    after = {k: v for k, v in model.module.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)

    features = {"input_ids": [[1, 5, 7, 2]] * 8, "attention_mask": [[1, 1, 1, 1]] * 8}
    data = EncodedSplit(features, np.array([0, 1] * 4))
    trainer = LocalTrainer(
        model, TrainSettings(lr=0.05, batch_size=4, local_steps=2), _collate, progress=False
    )
    update, _ = FederatedClient(3, data, trainer).fit(plan, seed=0)
    assert update.weights.rank == 2
    after = {k: v for k, v in model.module.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)  # later clients and evaluation see W0
    with pytest.raises(ValueError, match="fold"):
        apply_plan(model, plan)


def test_a_plan_with_a_fold_crosses_the_wire_and_validates(model):
    from hlora.federation.validation import validate_update

    ranks = {0: 1, 1: 4}
    srv = server("fedplora", ranks)
    srv.global_weights = adapter(4, seed=3)
    plans = srv.configure(1)
    round0 = adapter(4, seed=7, zero_b=True)
    for cid, plan in plans.items():
        decoded, meta = decode_plan(encode_plan(plan, cid, 1, 0), round0)
        assert meta["client-id"] == cid
        assert decoded.downlink().keys() == plan.downlink().keys()
        assert all(torch.equal(decoded.downlink()[k], t) for k, t in plan.downlink().items())
        assert (decoded.fold is None) == (ranks[cid] == 4)
    updates = updates_for(plans, {0: 5, 1: 5}, seed=2)
    assert all(validate_update(u, plans[u.client_id]) is None for u in updates)
    wide = ClientUpdate(0, 5, adapter(4, seed=1))  # the whole adapter from a rank-1 client
    assert validate_update(wide, plans[0]).code == "rank"


# --- resume: the run that never stopped ----------------------------------------------------------------


@pytest.mark.parametrize("crash", ["aggregate", "commit"])
def test_a_fedplora_run_crashed_in_round_2_resumes_to_the_uninterrupted_run(
    tiny_settings, tmp_path, monkeypatch, crash
):
    from hlora import checkpoint, simulation
    from hlora.federation import round as engine
    from hlora.federation.prepared import prepare
    from hlora.federation.server import FederatedServer
    from hlora.rundir import create_run_dir, read_metrics
    from tests.test_checkpoint import Crash, assert_same_run, configured, resume_in_process

    settings = configured(tiny_settings, "fedplora")  # ranks 2 and 4, bank rank 4: the rank-2 tier folds
    simulation.run(prepare(settings), create_run_dir(tmp_path / "whole"), progress=False)

    def aggregate(server, rnd, updates, original=FederatedServer.aggregate):
        if rnd == 2:
            raise Crash
        return original(server, rnd, updates)

    def save_checkpoint(run_dir, exp, rnd, metrics, original=engine.save_checkpoint):
        if rnd == 2:
            raise Crash
        original(run_dir, exp, rnd, metrics)

    run_dir = create_run_dir(tmp_path / "crashed")
    with monkeypatch.context() as patch:
        if crash == "aggregate":
            patch.setattr(FederatedServer, "aggregate", aggregate)
        else:
            patch.setattr(engine, "save_checkpoint", save_checkpoint)
        with pytest.raises(Crash):
            simulation.run(prepare(settings), run_dir, progress=False)
    assert checkpoint.open_resume(run_dir)[1].round == 1
    resume_in_process(run_dir)
    assert [row["round"] for row in read_metrics(run_dir)] == [1, 2, 3]
    assert_same_run(tmp_path / "whole", run_dir)
