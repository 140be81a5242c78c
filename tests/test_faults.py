"""Injected faults: seeded draws, corruptions that validation refuses, and runs that get through them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hlora import simulation
from hlora.aggregation import registry
from hlora.config import CORRUPT_KINDS, FaultSettings, FederationSettings, validate_settings
from hlora.errors import ConfigError
from hlora.federation.faults import ClientCrash, ClientTimeout, FaultInjector, corrupt_update
from hlora.federation.metrics import round_line, summarise
from hlora.federation.prepared import prepare
from hlora.federation.validation import validate_update
from hlora.rundir import create_run_dir, read_metrics
from tests.test_validation import honest, make_server, ranks_for

# The reason validation gives for each kind of corruption ("scale" needs a norm bound; the server
# refuses it by default against the round's other updates, as an "outlier").
REFUSED_AS = {
    "nan": "nonfinite",
    "inf": "nonfinite",
    "shape": "shape",
    "rank": "rank",
    "missing": "missing",
    "extra": "extra",
    "dtype": "dtype",
    "scale": "norm",
    "weight": "weight",
}


def test_every_corrupt_kind_has_a_reason():
    assert set(REFUSED_AS) == set(CORRUPT_KINDS)


# --- the draws ------------------------------------------------------------------------------------------


def draws(injector: FaultInjector, rounds=range(1, 21), clients=range(10)):
    return {(r, c): injector.draw(r, c) for r in rounds for c in clients}


def test_same_seed_same_faults_whatever_the_order_and_global_state():
    settings = FaultSettings(crash=0.2, timeout=0.2, corrupt=0.3)
    first = draws(FaultInjector(settings, seed=3))
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    again = FaultInjector(settings, seed=3)
    backwards = {key: again.draw(*key) for key in reversed(list(first))}
    assert backwards == first
    assert torch.equal(torch.random.get_rng_state(), torch_state)  # no global random state used
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert draws(FaultInjector(settings, seed=4)) != first


def test_fault_shares_follow_the_probabilities():
    injector = FaultInjector(FaultSettings(crash=0.1, timeout=0.2, corrupt=0.3, corrupt_kind="any"), seed=0)
    faults = list(draws(injector, rounds=range(1, 201), clients=range(50)).values())
    kinds = [f.kind if f is not None else None for f in faults]
    share = {k: kinds.count(k) / len(faults) for k in ("crash", "timeout")}
    corrupt = [f.corrupt_kind for f in faults if f is not None and f.kind == "corrupt"]
    assert share == {"crash": pytest.approx(0.1, abs=0.015), "timeout": pytest.approx(0.2, abs=0.015)}
    assert len(corrupt) / len(faults) == pytest.approx(0.3, abs=0.015)
    assert set(corrupt) == set(CORRUPT_KINDS)  # "any" draws every kind
    assert all(f is None for f in draws(FaultInjector(FaultSettings(), seed=0)).values())


def test_a_higher_probability_only_adds_faulty_clients():
    low = draws(FaultInjector(FaultSettings(crash=0.1), seed=0))
    high = draws(FaultInjector(FaultSettings(crash=0.3), seed=0))
    crashed = {k for k, f in low.items() if f is not None}
    assert crashed and crashed < {k for k, f in high.items() if f is not None}


# --- what each fault does to a client ---------------------------------------------------------------------


@pytest.mark.parametrize("method", registry.names())
@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_every_corruption_is_refused_by_validation_alone(method, kind):
    srv = make_server(method, ranks_for(method))
    plans = srv.configure(1)
    for cid, update in honest(plans).items():
        before = {k: v.clone() for k, v in update.weights.tensors().items()}
        bad = corrupt_update(update, plans[cid], kind, np.random.default_rng(cid))
        why = validate_update(bad, plans[cid], max_update_norm=10.0)
        assert why is not None and why.code == REFUSED_AS[kind], (cid, why)
        after = update.weights.tensors()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the original is left alone


@pytest.mark.parametrize("method", registry.names())
def test_a_scaled_update_is_refused_by_default_as_an_outlier(method):
    """With no `max_update_norm`, the default `update_norm_factor` refuses the boosted (x BOOST) update
    of one client against the round's honest others."""
    srv = make_server(method, ranks_for(method), update_norm_factor=FederationSettings().update_norm_factor)
    plans = srv.configure(1)
    updates = honest(plans)
    updates[1] = corrupt_update(updates[1], plans[1], "scale", np.random.default_rng(0))
    assert validate_update(updates[1], plans[1]) is None  # finite and well formed: only the round shows it
    outcome = srv.aggregate(1, list(updates.values()))
    assert {cid: why.code for cid, why in outcome.rejected.items()} == {1: "outlier"}
    assert outcome.accepted == (0, 2) and not outcome.failed


class FakeClient:
    def __init__(self, plan_update):
        self.client_id, self.update = plan_update
        self.calls = 0

    def fit(self, plan, seed):
        self.calls += 1
        return self.update, "result"


def injector_for(kind: str, corrupt_kind: str = "nan") -> FaultInjector:
    return FaultInjector(FaultSettings(**{kind: 1.0}, corrupt_kind=corrupt_kind), seed=0)


def test_a_crash_comes_before_training_and_a_timeout_after():
    srv = make_server("hlora", {0: 2, 1: 2})
    plans = srv.configure(1)
    client = FakeClient((0, honest(plans)[0]))
    with pytest.raises(ClientCrash, match="client 0 crashed"):
        injector_for("crash").fit(client, plans[0], 1, seed=0)
    assert client.calls == 0
    with pytest.raises(ClientTimeout, match="client 0 timed out"):
        injector_for("timeout").fit(client, plans[0], 1, seed=0)
    assert client.calls == 1
    update, _ = injector_for("corrupt").fit(client, plans[0], 1, seed=0)
    assert validate_update(update, plans[0]).code == "nonfinite"
    assert FaultInjector(FaultSettings(), seed=0).fit(client, plans[0], 1, seed=0)[0] is client.update


# --- config ---------------------------------------------------------------------------------------------


def test_fault_and_min_clients_config_is_checked(tiny_settings):
    raw = tiny_settings.model_dump()
    assert raw["faults"] == {"crash": 0.0, "timeout": 0.0, "corrupt": 0.0, "corrupt_kind": "any"}
    assert raw["federation"]["min_clients"] == 1 and raw["federation"]["max_update_norm"] is None
    for section, change, message in [
        ("faults", {"crash": 0.6, "corrupt": 0.6}, r"crash \+ timeout \+ corrupt is 1.2, above 1"),
        ("faults", {"timeout": 1.5}, r"'faults.timeout'"),
        ("faults", {"corrupt_kind": "bitflip"}, r"'faults.corrupt_kind'.*'scale'.*or 'any'"),
        ("federation", {"min_clients": 4}, r"min_clients \(4\) exceeds clients_per_round \(3\)"),
        ("federation", {"min_clients": 0}, r"'federation.min_clients'"),
        ("federation", {"max_update_norm": 0}, r"'federation.max_update_norm'"),
    ]:
        bad = tiny_settings.model_dump()
        bad[section].update(change)
        with pytest.raises(ConfigError, match=message):
            validate_settings(bad)


# --- a run with faults ----------------------------------------------------------------------------------


def faulty_settings(settings, method: str = "hlora"):
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"].update(method=method, rounds=3, min_clients=2, max_update_norm=50.0)
    raw["faults"].update(crash=0.2, timeout=0.2, corrupt=0.3)
    return validate_settings(raw)


def expected_faults(settings, rounds, clients):
    injector = FaultInjector(settings.faults, settings.run.seed)
    return {(r, c): injector.draw(r, c) for r in rounds for c in clients}


def test_a_run_with_faults_completes_and_records_them(tiny_settings, tmp_path):
    settings = faulty_settings(tiny_settings)
    exp = prepare(settings)
    summary = simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    faults = expected_faults(settings, [1, 2, 3], [0, 1, 2])
    kinds = {f.kind for f in faults.values() if f is not None}
    assert kinds == {"crash", "timeout", "corrupt"}  # this seed exercises every fault
    assert any(row["round_failed"] for row in rows) and not all(row["round_failed"] for row in rows)
    for row in rows:
        drawn = {str(c): faults[row["round"], c] for c in (0, 1, 2) if faults[row["round"], c] is not None}
        lost = {c: f.kind for c, f in drawn.items() if f.kind != "corrupt"}
        corrupt = {c: f.corrupt_kind for c, f in drawn.items() if f.kind == "corrupt"}
        assert row["clients"] == [0, 1, 2]
        assert row["failed_clients"] == lost
        assert row["corrupted_clients"] == corrupt
        assert row["rejected"] == {c: REFUSED_AS[k] for c, k in corrupt.items()}  # all caught, none else
        valid = [c for c in (0, 1, 2) if str(c) not in drawn]
        assert row["round_failed"] == (len(valid) < 2)
        assert row["aggregated_clients"] == ([] if row["round_failed"] else valid)
        assert sorted(row["client_update_norm"]) == [str(c) for c in valid]
        assert all(0 < n <= 50.0 for n in row["client_update_norm"].values())
        # uplink counts what arrived (refused updates too), downlink what every sampled client was sent
        assert sorted(row["client_uplink_bytes"]) == sorted(str(c) for c in (0, 1, 2) if str(c) not in lost)
        assert sorted(row["client_downlink_bytes"]) == ["0", "1", "2"]
        line = round_line(row, 3)
        assert all(f"c{c} {k}" in line for c, k in {**lost, **row["rejected"]}.items())
        assert ("round failed" in line) == row["round_failed"]
    for prev, row in zip([None, *rows], rows, strict=False):
        if row["round_failed"] and prev is not None:  # the kept model scores as it did
            assert row["accuracy"] == prev["accuracy"] and row["tier_accuracy"] == prev["tier_accuracy"]
    assert summary["failed_rounds"] == sum(r["round_failed"] for r in rows)
    assert sum(summary["rejected_by_reason"].values()) == sum(len(r["rejected"]) for r in rows)
    assert sum(summary["failed_clients_by_kind"].values()) == sum(len(r["failed_clients"]) for r in rows)
    assert exp.server.version == sum(not r["round_failed"] for r in rows)
    assert all(torch.isfinite(t).all() for t in exp.server.global_weights.tensors().values())
    assert all(math.isfinite(r["accuracy"]) for r in rows)


@pytest.mark.parametrize("method", ["flora", "ffa"])
def test_methods_with_client_state_get_through_faults(tiny_settings, tmp_path, method):
    """FLoRA's clients merge stacks they may have missed; FFA-LoRA's keep A frozen and unsent."""
    settings = faulty_settings(tiny_settings, method)
    exp = prepare(settings)
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert exp.server.version == sum(not r["round_failed"] for r in rows) >= 1
    if method == "flora":
        assert exp.model.merged_version == exp.server.version == len(exp.server.aggregator.deltas)
    assert all(torch.isfinite(t).all() for t in exp.server.global_weights.tensors().values())
    stacks = [t for d in exp.server.model_plan().merge for t in d.weights.tensors().values()]
    assert all(torch.isfinite(t).all() for t in stacks)


def test_summary_totals_the_failures():
    rows = [
        {"round": 1, "accuracy": 0.5, "uplink_bytes": 1, "downlink_bytes": 1, "wall_s": 1.0,
         "rejected": {"0": "nonfinite", "2": "norm"}, "failed_clients": {"1": "crash"}, "round_failed": True,
         "corrupted_clients": {"0": "nan", "2": "scale"}},
        {"round": 2, "accuracy": 0.6, "uplink_bytes": 1, "downlink_bytes": 1, "wall_s": 1.0,
         "rejected": {"1": "nonfinite"}, "failed_clients": {}, "round_failed": False,
         "corrupted_clients": {"1": "inf"}},
    ]  # fmt: skip
    summary = summarise(rows, {})
    assert summary["failed_rounds"] == 1
    assert summary["rejected_by_reason"] == {"nonfinite": 2, "norm": 1}
    assert summary["failed_clients_by_kind"] == {"crash": 1}
    assert summary["corrupted_by_kind"] == {"inf": 1, "nan": 1, "scale": 1}
    old = [{k: v for k, v in r.items() if k not in ("rejected", "round_failed")} for r in rows]
    assert "failed_rounds" not in summarise(old, {})  # rows from before these fields


def test_the_command_line_reports_a_round_that_failed(tiny_model_dir, glue_dir, tmp_path, capsys):
    from hlora.cli.main import main
    from tests.test_cli import CONFIGS, tiny_args

    args = ["run", "-c", str(CONFIGS / "mrpc-fedit.toml"), "--out", str(tmp_path / "run"), "-q"]
    with pytest.raises(SystemExit) as info:
        main([*args, *tiny_args(tiny_model_dir, glue_dir), "--set", "faults.crash=1.0"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "loss -" in out and "lost c0 crash c1 crash  round failed: global model kept" in out
    assert "faults: 1 failed round; lost: crash 2" in out
    (row,) = read_metrics(tmp_path / "run")
    assert row["train_loss"] is None and row["uplink_bytes"] == 0 and row["round_failed"]
