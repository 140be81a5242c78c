"""The heterogeneous aggregation methods: end to end with mixed ranks, and each rule on hand-built updates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from hlora import simulation
from hlora.aggregation import registry
from hlora.aggregation.products import product_mean, product_norms
from hlora.config import load_settings, validate_settings
from hlora.errors import AggregationError, ConfigError
from hlora.federation.prepared import prepare
from hlora.federation.ranks import assign_ranks
from hlora.federation.server import FederatedServer
from hlora.protocol import ClientUpdate
from hlora.rundir import create_run_dir, read_metrics
from hlora.weights import AdapterWeights, LoraFactors

HETEROGENEOUS = [name for name in registry.names() if not registry.get(name).equal_ranks]
LAYER = "layer.query"


def mixed_rank_settings(settings, method: str, rounds: int = 3, **options):
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"].update(method=method, rounds=rounds)
    raw["method_options"] = options
    return validate_settings(raw)


@pytest.mark.parametrize("method", HETEROGENEOUS)
def test_mixed_ranks_run_end_to_end(tiny_settings, tmp_path, method):
    exp = prepare(mixed_rank_settings(tiny_settings, method))
    assert sorted(exp.client_ranks.values()) == [1, 2, 4] and exp.bank_rank == 4
    summary = simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    ranks = {int(cid): r for cid, r in rows[0]["client_ranks"].items()}
    assert ranks == exp.client_ranks
    by_rank = sorted(ranks, key=ranks.get)  # client ids, lowest rank first
    # Tiny BERT: 2 layers x (query, value), m = n = 32, float32. Per adapted weight a rank-r client
    # uploads r (m + n) floats, or r m with FFA-LoRA's frozen A; the head is the same for every rank.
    per_rank = 2 * 2 * (32 if method == "ffa" else 32 + 32) * 4
    stack = sum(ranks.values()) * 2 * 2 * (32 + 32) * 4  # FLoRA: one round's stack, total rank 7
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["train_loss"] > 0
        up = [r["client_uplink_bytes"][str(cid)] for cid in by_rank]
        down = [r["client_downlink_bytes"][str(cid)] for cid in by_rank]
        assert up[0] < up[1] < up[2]  # traffic shrinks with the client's rank
        assert up[2] - up[0] == (4 - 1) * per_rank and up[1] - up[0] == (2 - 1) * per_rank
        assert sum(up) == r["uplink_bytes"] and sum(down) == r["downlink_bytes"]
        if method == "flora":  # fresh factors are rebuilt from the seed: down goes the head, then stacks
            head = up[0] - 1 * 2 * 2 * (32 + 32) * 4
            assert down == [head + (stack if r["round"] > 1 else 0)] * 3
        elif method == "fedplora":  # each client gets the whole global adapter: its modules and the fold
            assert down == [up[2]] * 3
        else:
            assert down == up
    assert summary["client_ranks"] == [1, 2, 4] and summary["bank_rank"] == 4
    # The instruments, against the exact product mean of the round's updates: FLoRA's stack and FFA-LoRA's
    # shared A keep it; zero-padding is biased; HLoRA and FlexLoRA cut the total rank 7 to the bank's 4.
    for r in rows:
        figures = r["instruments"]
        assert list(figures["block_energy"]) == ["0-1", "1-2", "2-4", "4+"] and figures["norm"] > 0
        assert sum(figures["block_energy"].values()) == pytest.approx(1.0)
        assert (figures["rel_error"] < 1e-5) is (method in ("flora", "ffa"))
        assert r["instruments_s"] >= 0
    table = (tmp_path / "run" / "partition.csv").read_text().splitlines()
    assert table[0].startswith("client,size,rank,")
    assert {int(line.split(",")[0]): int(line.split(",")[2]) for line in table[1:]} == exp.client_ranks
    trained = exp.model.read(4)
    assert all(torch.isfinite(t).all() for t in trained.tensors().values())


def test_tier_scores_in_the_last_round_only_with_eval_tiers_final(tiny_settings, tmp_path):
    settings = mixed_rank_settings(tiny_settings, "hlora", rounds=2)
    raw = settings.model_dump()
    raw["eval"]["tiers"] = "final"
    summary = simulation.run(prepare(validate_settings(raw)), create_run_dir(tmp_path / "run"))
    first, last = read_metrics(tmp_path / "run")
    assert "tier_accuracy" not in first and "tier_eval_s" not in first
    assert sorted(last["tier_accuracy"], key=int) == ["1", "2", "4"] and "tier_eval_s" in last
    assert last["tier_accuracy"]["4"] == last["accuracy"]  # the bank-rank tier holds the global adapter
    assert summary["final_tier_accuracy"] == last["tier_accuracy"]
    with pytest.raises(ConfigError, match="tiers"):
        load_settings(None, ["eval.tiers=last"])


def test_norm_weighted_zeropad_runs(tiny_settings, tmp_path):
    exp = prepare(mixed_rank_settings(tiny_settings, "zeropad", rounds=1, norm_weighting=True))
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    assert len(read_metrics(tmp_path / "run")) == 1


def test_fedit_refuses_mixed_ranks_before_anything_runs(tiny_settings):
    with pytest.raises(AggregationError, match="fedit needs one rank.*method for mixed ranks"):
        prepare(mixed_rank_settings(tiny_settings, "fedit"))


def test_fedit_server_refuses_mixed_ranks():
    fedit = registry.create("fedit", bank_rank=4)
    initial = AdapterWeights({LAYER: LoraFactors(torch.zeros(3, 4), torch.zeros(4, 5))})
    with pytest.raises(AggregationError, match="fedit needs one rank.*method for mixed ranks"):
        FederatedServer(fedit, initial, {0: 1, 1: 4}, clients_per_round=2, seed=0)


def test_shipped_heterogeneous_config_loads():
    s = load_settings(Path(__file__).resolve().parents[1] / "configs" / "mrpc-hetero.toml")
    assert s.federation.method == "hlora" and s.lora.rank_policy == "tiers"
    ranks = assign_ranks(s.lora, [1] * s.federation.num_clients, s.run.seed)
    assert Counter(ranks.values()) == {2: 3, 4: 3, 8: 2, 16: 2}  # what the file's comment promises


def test_registry_names_the_six_baselines_and_the_rules_since():
    six = {"fedit", "zeropad", "hlora", "flexlora", "flora", "ffa"}
    assert six <= set(registry.names()) and {"hlora_ef", "rablock"} <= set(registry.names())


def test_registry_capabilities_stand_in_for_method_names():
    """Callers outside aggregation/ ask the registry, not a name: the order comparisons list methods in
    (the subject first), the references' rule, and which methods need one rank for all."""
    ordered = registry.ordered()
    assert sorted(ordered) == registry.names() and ordered[0] == "hlora"
    assert registry.reference() == "fedit"
    assert [m for m in ordered if registry.get(m).equal_ranks] == ["fedit"]


def test_a_method_of_equal_ranks_refuses_mixed_ranks_by_its_capability():
    for name in registry.names():
        agg = registry.create(name, bank_rank=4)
        agg.check_ranks({0: 4, 1: 4})  # one rank: everyone serves it
        if registry.get(name).equal_ranks:
            with pytest.raises(AggregationError, match=f"{name} needs one rank.*\\[2, 4\\]"):
                agg.check_ranks({0: 2, 1: 4})
        else:
            agg.check_ranks({0: 2, 1: 4})


def test_unknown_method_option_is_a_config_error_naming_it(tiny_settings):
    raw = tiny_settings.model_dump()
    raw["federation"]["method"] = "zeropad"
    raw["method_options"] = {"norm_weigting": True}
    with pytest.raises(ConfigError, match=r"method_options\.norm_weigting.*allowed: norm_weighting"):
        validate_settings(raw)
    raw["federation"]["method"] = "hlora"
    raw["method_options"] = {"norm_weighting": True}
    with pytest.raises(ConfigError, match=r"method_options\.norm_weighting.*'hlora' takes no options"):
        validate_settings(raw)
    with pytest.raises(ConfigError, match=r"method_options\.oops"):
        registry.create("zeropad", bank_rank=4, options={"oops": 1})


def test_options_reach_the_aggregator():
    assert registry.create("zeropad", bank_rank=4).options.norm_weighting is False
    assert registry.create("zeropad", bank_rank=4, options={"norm_weighting": True}).options.norm_weighting
    assert registry.create("hlora", bank_rank=4).options is None


# --- the rules on hand-built updates -------------------------------------------------------------------


def update(cid: int, n: int, B: torch.Tensor, A: torch.Tensor) -> ClientUpdate:
    head = {"classifier.bias": torch.full((2,), float(cid))}
    return ClientUpdate(cid, n, AdapterWeights({LAYER: LoraFactors(B, A)}, head))


def random_updates(ranks, m=12, n=10, sizes=None, seed=0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [10 * (k + 1) for k in range(len(ranks))]
    return [
        update(
            k,
            sizes[k],
            torch.randn(m, r, generator=g, dtype=torch.float64),
            torch.randn(r, n, generator=g, dtype=torch.float64),
        )
        for k, r in enumerate(ranks)
    ]


def aggregate(method: str, updates, bank_rank: int, **options) -> AdapterWeights:
    agg = registry.create(method, bank_rank=bank_rank, options=options or None)
    init = torch.randn(bank_rank, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = agg.initial_global(AdapterWeights({LAYER: LoraFactors(torch.zeros(12, bank_rank), init)}))
    return agg.aggregate(start, updates)


def pairs(updates):
    return [(u.weights.factors[LAYER].B, u.weights.factors[LAYER].A) for u in updates]


def product(adapter: AdapterWeights) -> torch.Tensor:
    f = adapter.factors[LAYER]
    return f.B @ f.A


def test_hlora_is_exact_when_the_total_rank_fits_and_zeropad_is_not():
    updates = random_updates([1, 2, 3])  # R = 6 <= bank rank 6
    p = [u.num_samples for u in updates]
    exact = product_mean(pairs(updates), p)
    hl = aggregate("hlora", updates, bank_rank=6)
    assert hl.factors[LAYER].rank == 6
    torch.testing.assert_close(product(hl), exact, rtol=1e-10, atol=1e-10)
    zp = aggregate("zeropad", updates, bank_rank=6)
    assert zp.factors[LAYER].rank == 6
    assert torch.linalg.matrix_norm(product(zp) - exact) > 0.1 * torch.linalg.matrix_norm(exact)


def test_hlora_and_flexlora_give_the_same_products():
    updates = random_updates([1, 2, 4, 4])
    for bank_rank in (4, 6, 11):  # truncating, and with room for every component
        hl = aggregate("hlora", updates, bank_rank)
        fl = aggregate("flexlora", updates, bank_rank)
        torch.testing.assert_close(product(hl), product(fl), rtol=1e-9, atol=1e-9)
        for r in (1, 2, 4):  # and the same cut for every client rank
            torch.testing.assert_close(product(hl.truncate(r)), product(fl.truncate(r)), rtol=1e-9, atol=1e-9)


def test_truncation_is_the_best_low_rank_approximation():
    updates = random_updates([2, 4, 4])
    exact = product_mean(pairs(updates), [u.num_samples for u in updates])
    S = torch.linalg.svdvals(exact)
    hl = aggregate("hlora", updates, bank_rank=4)
    for r in (1, 2, 4):  # Eckart-Young: the error of the first r components is the tail of S
        err = torch.linalg.matrix_norm(product(hl.truncate(r)) - exact)
        torch.testing.assert_close(err, S[r:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)


def test_heads_are_averaged_with_the_data_weights_in_every_method():
    updates = random_updates([1, 2, 4], sizes=[10, 30, 60])
    for method in HETEROGENEOUS:
        head = aggregate(method, updates, bank_rank=4).dense["classifier.bias"]
        torch.testing.assert_close(head, torch.full((2,), 0 * 0.1 + 1 * 0.3 + 2 * 0.6))


def test_zeropad_pads_and_averages_with_data_weights():
    B1, A1 = torch.ones(3, 1), torch.ones(1, 2)
    B2, A2 = 2 * torch.ones(3, 2), 2 * torch.ones(2, 2)
    out = aggregate("zeropad", [update(0, 1, B1, A1), update(1, 3, B2, A2)], bank_rank=2).factors[LAYER]
    torch.testing.assert_close(out.B[:, 0], torch.full((3,), 0.25 * 1 + 0.75 * 2))
    torch.testing.assert_close(out.B[:, 1], torch.full((3,), 0.75 * 2))  # client 0's zero dilutes it
    torch.testing.assert_close(out.A[1], torch.full((2,), 0.75 * 2))


def test_zeropad_norm_weighting_uses_the_update_norms():
    # client 0: B A = 1 * ones(3, 2), ||.||_F = sqrt(6); client 1: B A = 2 * [2 2] per entry = 8 * ones,
    # ||.||_F = 8 sqrt(6). Weights by norm: 1/9 and 8/9, whatever the data sizes (1 and 3).
    B1, A1 = torch.ones(3, 1), torch.ones(1, 2)
    B2, A2 = 2 * torch.ones(3, 2), 2 * torch.ones(2, 2)
    updates = [update(0, 1, B1, A1), update(1, 3, B2, A2)]
    norms = product_norms(pairs(updates))
    torch.testing.assert_close(norms, torch.tensor([6**0.5, 8 * 6**0.5], dtype=torch.float64))
    out = aggregate("zeropad", updates, bank_rank=2, norm_weighting=True)
    f = out.factors[LAYER]
    torch.testing.assert_close(f.B[:, 0], torch.full((3,), 1 / 9 * 1 + 8 / 9 * 2))
    torch.testing.assert_close(f.A[1], torch.full((2,), 8 / 9 * 2))
    # the head keeps the data weights p = (1/4, 3/4)
    torch.testing.assert_close(out.dense["classifier.bias"], torch.full((2,), 0.75))


def test_norm_weighting_falls_back_to_data_weights_for_zero_updates():
    zero = [update(k, n, torch.zeros(3, r), torch.ones(r, 2)) for k, (n, r) in enumerate([(1, 1), (3, 2)])]
    out = aggregate("zeropad", zero, bank_rank=2, norm_weighting=True).factors[LAYER]
    torch.testing.assert_close(out.A[0], torch.ones(2))  # 1/4 * 1 + 3/4 * 1
    torch.testing.assert_close(out.A[1], torch.full((2,), 0.75))


def test_product_norms_match_the_dense_products():
    updates = random_updates([1, 3, 5], seed=3)
    dense = torch.stack([torch.linalg.matrix_norm(B @ A) for B, A in pairs(updates)])
    torch.testing.assert_close(product_norms(pairs(updates)), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", HETEROGENEOUS)
def test_bad_updates_are_aggregation_errors_naming_the_layer(method):
    bad = [
        update(0, 5, torch.ones(12, 2), torch.ones(2, 10)),
        update(1, 5, torch.ones(7, 2), torch.ones(2, 10)),
    ]
    with pytest.raises(AggregationError, match=f"{method} cannot .*{LAYER}"):
        aggregate(method, bad, bank_rank=4)


def test_zeropad_refuses_a_client_above_the_bank_rank():
    with pytest.raises(AggregationError, match="zeropad cannot aggregate layer.query"):
        aggregate("zeropad", random_updates([2, 8]), bank_rank=4)
