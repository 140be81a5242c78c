"""Per-tier quality and cost in the round loop: what each rank tier holds, scores and spends."""

from __future__ import annotations

import json

import torch

from hlora import simulation
from hlora.aggregation import registry
from hlora.config import validate_settings
from hlora.evaluation import evaluate, evaluate_with_spread
from hlora.federation import round as engine
from hlora.federation.prepared import prepare
from hlora.federation.server import FederatedServer
from hlora.rundir import create_run_dir, read_metrics
from hlora.weights import AdapterWeights, LoraFactors


def with_changes(settings, **sections):
    raw = settings.model_dump()
    for section, values in sections.items():
        raw[section].update(values)
    return validate_settings(raw)


def mixed(settings, **sections):
    """One client in each of the tiers 1, 2 and 4, aggregated by HLoRA at bank rank 4."""
    return with_changes(
        settings,
        lora={"rank_policy": "tiers", "tiers": [1, 2, 4]},
        federation={"method": "hlora"},
        **sections,
    )


def test_every_tier_is_scored_and_costed_each_round(tiny_settings, tmp_path):
    exp = prepare(mixed(tiny_settings))
    summary = simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        for key in ("tier_accuracy", "tier_f1", "tier_step_s", "tier_peak_bytes", "tier_state_bytes"):
            assert list(row[key]) == ["1", "2", "4"], key
        # the top tier's rank is the bank rank and HLoRA sends it the global adapter as it is
        assert row["tier_accuracy"]["4"] == row["accuracy"] and row["tier_f1"]["4"] == row["f1"]
        assert all(0.0 <= acc <= 1.0 for acc in row["tier_accuracy"].values())
        assert all(s > 0 for s in row["tier_step_s"].values())
        assert all(b > 0 for b in row["tier_peak_bytes"].values())
        # the trainable state grows with the rank, whatever each client's batches are
        state = list(row["tier_state_bytes"].values())
        assert state == sorted(state) and len(set(state)) == 3
        assert all(s < p for s, p in zip(state, row["tier_peak_bytes"].values(), strict=True))
        assert row["tier_eval_s"] >= 0
    # a lower tier's score is that of the global adapter cut to its rank, scored on its own
    s = exp.settings
    held = exp.server.model_plan(1).adapter
    assert held.rank == 1
    assert evaluate(exp.model, held, exp.dev, exp.task, s.eval.batch_size, exp.collate) == {
        "accuracy": rows[-1]["tier_accuracy"]["1"],
        "f1": rows[-1]["tier_f1"]["1"],
    }
    assert summary["final_tier_accuracy"] == rows[-1]["tier_accuracy"]
    assert summary["final_tier_f1"] == rows[-1]["tier_f1"]
    assert list(summary["mean_tier_step_s"]) == list(summary["max_tier_peak_bytes"]) == ["1", "2", "4"]
    assert summary["max_tier_peak_bytes"]["1"] == max(r["tier_peak_bytes"]["1"] for r in rows)
    assert summary["max_tier_state_bytes"]["4"] == max(r["tier_state_bytes"]["4"] for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_tier_scoring_can_be_turned_off(tiny_settings, tmp_path):
    exp = prepare(mixed(tiny_settings, eval={"tiers": False}))
    summary = simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    for row in read_metrics(tmp_path / "run"):
        assert not {"tier_accuracy", "tier_f1", "tier_eval_s"} & row.keys()
        assert list(row["tier_step_s"]) == ["1", "2", "4"]  # the cost is measured anyway
    assert "final_tier_accuracy" not in summary and "mean_tier_step_s" in summary


def test_equal_ranks_reuse_the_global_score_without_another_pass(tiny_settings, tmp_path, monkeypatch):
    passes = []

    def counting(score):
        def counted(*args, **kwargs):
            passes.append(1)
            return score(*args, **kwargs)

        return counted

    monkeypatch.setattr(engine, "evaluate", counting(evaluate))  # the tiers' passes
    monkeypatch.setattr(engine, "evaluate_with_spread", counting(evaluate_with_spread))  # the global one's
    exp = prepare(tiny_settings)  # every client at rank 4, FedIT
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert len(passes) == len(rows) == 2
    assert all(r["tier_accuracy"] == {"4": r["accuracy"]} for r in rows)


def test_server_model_plan_is_what_the_method_sends_that_rank():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    initial = AdapterWeights({"layer": LoraFactors(B, A)})
    server = FederatedServer(registry.create("hlora", bank_rank=4), initial, {0: 2, 1: 4}, 2, seed=0)
    plans = server.configure(1)
    for cid, rank in server.client_ranks.items():
        held = server.model_plan(rank).adapter
        assert held.rank == rank
        assert all(torch.equal(held.tensors()[k], v) for k, v in plans[cid].adapter.tensors().items())


def test_flora_tiers_hold_the_merged_base(tiny_settings, tmp_path):
    """FLoRA's update lives in the base weights: every tier folds the same stacks in and starts a fresh
    adapter (B = 0), so each tier scores as the global model does although its adapter differs."""
    settings = with_changes(
        tiny_settings,
        lora={"rank_policy": "tiers", "tiers": [1, 2, 4]},
        federation={"method": "flora"},
    )
    exp = prepare(settings)
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert exp.model.merged_version == len(rows) == 2
    for row in rows:
        assert row["tier_accuracy"] == {r: row["accuracy"] for r in ("1", "2", "4")}
        assert row["tier_f1"] == {r: row["f1"] for r in ("1", "2", "4")}
