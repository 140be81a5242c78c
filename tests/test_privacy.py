"""Client-level differential privacy (`hlora.privacy`, issue 22 item 1): the change norm against a dense
reference, the mechanism against the plain aggregate and its noise against sigma, the accountant against
dp_accounting's own figure, the config's refusals, and runs that record epsilon, stop at a budget and
resume bit for bit."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora import checkpoint, simulation
from hlora.aggregation import registry
from hlora.config import Settings, fingerprinted, settings_to_toml, validate_settings
from hlora.errors import ConfigError
from hlora.federation.prepared import prepare
from hlora.federation.server import FederatedServer
from hlora.privacy.accountant import PrivacyAccountant, epsilon, round_event
from hlora.privacy.clipping import change_norm, clip_coefficient
from hlora.privacy.mechanism import DpMechanism, GaussianNoise
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.rundir import create_run_dir, read_metrics
from hlora.weights import AdapterWeights, LoraFactors

PRIVATE = [name for name in registry.names() if registry.get(name).private_space is not None]
SHAPES = {"l0": (6, 5), "l1": (4, 7)}


def adapter(rank: int, g: torch.Generator, scale: float = 1.0) -> AdapterWeights:
    factors = {
        name: LoraFactors(
            scale * torch.randn(m, rank, generator=g), scale * torch.randn(rank, n, generator=g)
        )
        for name, (m, n) in SHAPES.items()
    }
    return AdapterWeights(factors, {"head.weight": torch.randn(2, 3, generator=g)})


def trained_from(plan: ClientPlan, g: torch.Generator, scale: float = 1.0) -> AdapterWeights:
    """What a client 'trains': what it was sent plus seeded noise on what it trains."""
    start = plan.adapter
    factors = {
        name: LoraFactors(
            f.B + scale * torch.randn(f.B.shape, generator=g),
            f.A + scale * torch.randn(f.A.shape, generator=g) if plan.train_a else f.A,
        )
        for name, f in start.factors.items()
    }
    dense = {name: t + scale * torch.randn(t.shape, generator=g) for name, t in start.dense.items()}
    return AdapterWeights(factors, dense)


def toy_round(method: str, ranks: dict[int, int], seed: int = 0, scale: float = 1.0):
    """A method at bank rank max(ranks), its round-0 global adapter, each client's plan and update."""
    g = torch.Generator().manual_seed(seed)
    agg = registry.create(method, max(ranks.values()), 0, {})
    g_w = agg.initial_global(adapter(max(ranks.values()), g))
    plans = {cid: agg.plan_for(g_w, r) for cid, r in ranks.items()}
    updates = [ClientUpdate(cid, 10 * (cid + 1), trained_from(p, g, scale)) for cid, p in plans.items()]
    return agg, g_w, plans, updates


# --- the change and its norm ----------------------------------------------------------------------------


@settings(deadline=None, derandomize=True, max_examples=25)
@given(
    r=st.integers(1, 4),
    r0=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    space=st.sampled_from(["products", "factors"]),
)
def test_the_change_norm_is_the_dense_one(r, r0, seed, space):
    """Mixed ranks (the trained adapter's rank differs from the one sent), head included: the Gram path
    equals the norm of the dense `B A - B0 A0` (products) or of the travelling tensors' change (factors)."""
    g = torch.Generator().manual_seed(seed)
    sent, trained = adapter(r0, g), adapter(r, g)
    plan = ClientPlan(sent)
    if space == "products":
        squares = [
            (trained.factors[k].B.double() @ trained.factors[k].A.double()
             - sent.factors[k].B.double() @ sent.factors[k].A.double()).square().sum()
            for k in SHAPES
        ]  # fmt: skip
    else:
        trained = adapter(r0, g)  # factor space: one rank, as the linear rules' clients have
        before = sent.tensors()
        squares = [
            (t.double() - before[k].double()).square().sum()
            for k, t in trained.tensors().items()
            if not k.startswith("head")
        ]
    squares.append(
        (trained.dense["head.weight"].double() - sent.dense["head.weight"].double()).square().sum()
    )
    want = math.sqrt(float(sum(squares)))
    assert change_norm(plan, trained, space) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_the_factor_norm_leaves_out_what_does_not_travel():
    agg, g_w, plans, updates = toy_round("ffa", {0: 2})
    plan, trained = plans[0], updates[0].weights
    want = math.sqrt(sum(float((t.double() - plan.adapter.tensors()[k].double()).square().sum())
                         for k, t in trained.tensors().items() if not k.endswith("lora_A")))  # fmt: skip
    assert change_norm(plan, trained, "factors") == pytest.approx(want, rel=1e-12)


def test_clipping_is_idempotent_below_the_clip():
    """A change scaled by its coefficient is within C; clipped again, it is left alone (c = 1)."""
    agg, g_w, plans, updates = toy_round("zeropad", {0: 2, 1: 3})
    for u in updates:
        plan = plans[u.client_id]
        norm = change_norm(plan, u.weights, "factors")
        c = clip_coefficient(norm, norm / 3)
        assert c == pytest.approx(1 / 3)
        sent = plan.adapter.tensors()
        clipped = AdapterWeights.from_tensors(
            {k: sent[k] + c * (t - sent[k]) for k, t in u.weights.tensors().items()}
        )
        again = change_norm(plan, clipped, "factors")
        assert again == pytest.approx(norm / 3, rel=1e-5)
        assert clip_coefficient(again, norm / 3 * (1 + 1e-5)) == 1.0
    assert clip_coefficient(0.0, 1.0) == 1.0 and clip_coefficient(2.0, math.inf) == 1.0
    with pytest.raises(ValueError, match="clip norm"):
        clip_coefficient(1.0, 0.0)


# --- the mechanism ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PRIVATE)
def test_without_clip_and_noise_the_mechanism_is_the_plain_uniform_aggregate(method):
    ranks = {0: 3, 1: 3, 2: 3} if registry.get(method).equal_ranks else {0: 1, 1: 2, 2: 3}
    agg, g_w, plans, updates = toy_round(method, ranks)
    plain = agg.aggregate(g_w, [dataclasses.replace(u, num_samples=1) for u in updates])
    private, record = DpMechanism(math.inf, 0.0, 3, seed=0).aggregate(agg, g_w, 1, plans, updates)
    assert record.clipped == 0 and record.sigma == 0
    for name, t in plain.tensors().items():
        torch.testing.assert_close(private.tensors()[name], t, rtol=1e-5, atol=1e-5)


def test_the_products_path_clips_in_product_space():
    """With a clip below every change, the noiseless mean is `sum_k [B0_k A0_k / m + (c_k / m) (B_k A_k -
    B0_k A0_k)]`, re-factored at the bank rank."""
    agg, g_w, plans, updates = toy_round("hlora", {0: 1, 1: 2, 2: 3}, scale=0.1)
    mech = DpMechanism(0.05, 0.0, 3, seed=0)
    private, record = mech.aggregate(agg, g_w, 1, plans, updates)
    assert record.clipped == 3
    for layer in SHAPES:
        want = torch.zeros(SHAPES[layer], dtype=torch.float64)
        for u in updates:
            p, f = plans[u.client_id].adapter.factors[layer], u.weights.factors[layer]
            before = p.B.double() @ p.A.double()
            want += before / 3 + record.coefficients[u.client_id] / 3 * (f.B.double() @ f.A.double() - before)
        U, S, Vh = torch.linalg.svd(want, full_matrices=False)
        best = U[:, :3] * S[:3] @ Vh[:3]  # the bank rank 3 cuts the mean's rank 5: Eckart-Young's best
        got = private.factors[layer].B.double() @ private.factors[layer].A.double()
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-6)


def test_a_refused_client_of_the_sample_adds_what_it_was_sent_and_no_change():
    agg, g_w, plans, updates = toy_round("hlora", {0: 2, 1: 2, 2: 2})
    private, record = DpMechanism(math.inf, 0.0, 3, seed=0).aggregate(agg, g_w, 1, plans, updates[:2])
    assert sorted(record.coefficients) == [0, 1]
    sent = plans[2].adapter
    fake = [*updates[:2], ClientUpdate(2, 1, sent)]  # the same as sending back what it got
    same, _ = DpMechanism(math.inf, 0.0, 3, seed=0).aggregate(agg, g_w, 1, plans, fake)
    for name, t in same.tensors().items():
        torch.testing.assert_close(private.tensors()[name], t)


@pytest.mark.parametrize("method", ["hlora", "zeropad"])
def test_the_noise_has_the_standard_deviation_z_c_over_m(method, monkeypatch):
    """No client changes anything: the noisy mean minus the mean is the noise alone (seeded, so fixed)."""
    SHAPES_BIG = {"l0": (60, 50), "l1": (40, 70)}
    monkeypatch.setitem(globals(), "SHAPES", SHAPES_BIG)
    agg, g_w, plans, _ = toy_round(method, {0: 8, 1: 8, 2: 8, 3: 8})
    updates = [ClientUpdate(cid, 1, p.adapter) for cid, p in plans.items()]
    mech = DpMechanism(clip=0.5, noise_multiplier=1.2, clients_per_round=4, seed=3)
    assert mech.sigma == pytest.approx(1.2 * 0.5 / 4)
    captured = {}

    def keep(global_weights, layers, dense):
        captured.update(layers, **dense)
        return global_weights

    monkeypatch.setattr(agg, "from_noisy_mean", keep)
    mech.aggregate(agg, g_w, 1, plans, updates)
    noise = []
    for name, t in captured.items():
        if name in SHAPES_BIG:  # products: the dense mean
            f = g_w.factors[name]
            noise.append((t - f.B.double() @ f.A.double()).flatten())
        else:
            noise.append((t - g_w.tensors()[name].double()).flatten())
    noise = torch.cat(noise)
    assert noise.numel() > 1500
    assert abs(float(noise.mean())) < 0.1 * mech.sigma
    assert float(noise.std()) == pytest.approx(mech.sigma, rel=0.1)


def test_seeded_noise_repeats_and_os_noise_does_not():
    a, b = GaussianNoise(7).draw((1000,)), GaussianNoise(7).draw((1000,))
    assert torch.equal(a, b) and not torch.equal(a, GaussianNoise(8).draw((1000,)))
    s1, s2 = GaussianNoise(None).draw((20000,)), GaussianNoise(None).draw((20000,))
    assert not torch.equal(s1, s2)
    assert float(s1.mean()) == pytest.approx(0, abs=0.05) and float(s1.std()) == pytest.approx(1, rel=0.05)


# --- the accountant ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n", "z"), [(3, 10, 1.3), (10, 10, 1.3), (4, 10, 0.5), (20, 100, 2.0)])
def test_the_accountant_is_dp_accountings_own_figure(m, n, z):
    delta, rounds = 1e-3, 7
    gaussian = dp_event.GaussianDpEvent(z / 2)  # replace-one: the clipped sum moves by up to 2 C
    event = gaussian if m == n else dp_event.SampledWithoutReplacementDpEvent(n, m, gaussian)

    def library(e):
        acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_event.SelfComposedDpEvent(e, rounds))
        return acc.get_epsilon(delta)

    # sampled: the smaller of the library's sampled bound and its unsampled Gaussian (both valid)
    assert epsilon(rounds, z, m, n, delta) == pytest.approx(min(library(event), library(gaussian)), rel=1e-12)
    assert epsilon(rounds, z, m, n, delta) <= library(event)
    assert round_event(z, m, n) == event
    if m == n:  # no sampling: the Gaussian mechanism composed, RDP alpha rounds / (2 (z/2)^2)
        assert epsilon(rounds, z, m, n, delta) > 0


def test_at_small_noise_the_unsampled_bound_is_the_tighter():
    # dp_accounting's without-replacement bound lies above the plain Gaussian's here; the accountant
    # reports the plain one, which sampling cannot exceed
    gaussian = dp_event.GaussianDpEvent(0.25)
    sampled = dp_event.SampledWithoutReplacementDpEvent(10, 4, gaussian)
    figures = []
    for e in (sampled, gaussian):
        acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        acc.compose(e, 20)
        figures.append(acc.get_epsilon(1e-3))
    assert figures[0] > figures[1]
    assert epsilon(20, 0.5, 4, 10, 1e-3) == pytest.approx(figures[1], rel=1e-12)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    acc = PrivacyAccountant(1.0, 3, 10, 1e-3)
    eps = [acc.epsilon(t) for t in range(6)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert epsilon(5, 2.0, 3, 10, 1e-3) < epsilon(5, 1.0, 3, 10, 1e-3)
    assert epsilon(5, 1.0, 2, 10, 1e-3) < epsilon(5, 1.0, 5, 10, 1e-3)  # sampling amplifies
    assert epsilon(1, 0.0, 3, 10, 1e-3) == math.inf


# --- the config ---------------------------------------------------------------------------------------------


def with_privacy(settings: Settings, method: str = "hlora", **privacy) -> dict:
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[2, 4])
    raw["federation"].update(method=method, rounds=3)
    raw["privacy"] = privacy
    return raw


@pytest.mark.parametrize(
    ("method", "privacy", "message"),
    [
        ("hlora", {"noise_multiplier": 1.0}, "privacy.noise_multiplier needs privacy.clip"),
        ("hlora", {"delta": 1e-3}, "privacy.delta needs privacy.clip"),
        ("hlora", {"clip": 1.0, "epsilon_budget": 3.0}, "privacy.epsilon_budget needs privacy.noise_multi"),
        ("hlora", {"clip": 1.0, "delta": 0.5}, "privacy.delta (0.5) must be below 1 / federation.num_cli"),
        ("hlora", {"clip": -1.0}, "privacy.clip"),
        ("flora", {"clip": 1.0}, "[privacy] with federation.method 'flora'"),
        ("rablock", {"clip": 1.0}, "[privacy] with federation.method 'rablock'"),
    ],
)
def test_settings_that_make_no_sense_are_refused_in_one_line(tiny_settings, method, privacy, message):
    with pytest.raises(ConfigError) as e:
        validate_settings(with_privacy(tiny_settings, method, **privacy))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_zeropad_norm_weighting_is_refused_under_privacy(tiny_settings):
    raw = with_privacy(tiny_settings, "zeropad", clip=1.0)
    raw["method_options"] = {"norm_weighting": True}
    with pytest.raises(ConfigError, match="norm_weighting"):
        validate_settings(raw)


def test_without_privacy_the_config_and_fingerprint_are_as_before(tiny_settings):
    assert "privacy" not in fingerprinted(tiny_settings)
    assert "[privacy]" not in settings_to_toml(tiny_settings)
    on = validate_settings(with_privacy(tiny_settings, clip=1.0, noise_multiplier=1.0))
    assert fingerprinted(on)["privacy"]["clip"] == 1.0 and "[privacy]" in settings_to_toml(on)


def test_the_references_run_without_privacy(tiny_settings):
    raw = with_privacy(tiny_settings, clip=1.0, noise_multiplier=1.0)
    raw["run"]["mode"] = "centralized"
    exp = prepare(validate_settings(raw))
    assert not exp.settings.privacy.enabled and exp.server.privacy is None


def test_privacy_turns_the_relative_outlier_rule_off(tiny_settings):
    exp = prepare(validate_settings(with_privacy(tiny_settings, clip=1.0, noise_multiplier=1.0)))
    assert isinstance(exp.server, FederatedServer)
    assert exp.server.update_norm_factor is None and exp.server.privacy is not None


# --- runs ---------------------------------------------------------------------------------------------------


def test_a_private_run_writes_epsilon_and_stops_at_its_budget(tiny_settings, tmp_path):
    budget = epsilon(2, 2.0, 3, 3, 1 / 3**1.1) * 1.001  # room for two rounds, not three
    settings = validate_settings(
        with_privacy(tiny_settings, clip=0.5, noise_multiplier=2.0, epsilon_budget=budget)
    )
    run_dir = create_run_dir(tmp_path / "run")
    summary = simulation.run(prepare(settings), run_dir, progress=False)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] <= budget
    assert rows[0]["privacy"]["delta"] == pytest.approx(1 / 3**1.1)
    assert rows[0]["privacy"]["sigma"] == pytest.approx(2.0 * 0.5 / 3)
    assert rows[-1]["evaluated"]  # the last round the budget allows is scored
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    assert saved["privacy"]["epsilon"] == eps[-1] and "privacy budget: round 3" in saved["stopped"]


def test_a_resumed_private_run_is_the_run_that_never_stopped(tiny_settings, tmp_path, monkeypatch):
    from tests.test_checkpoint import Crash, assert_same_run, resume_in_process

    settings = validate_settings(with_privacy(tiny_settings, clip=0.5, noise_multiplier=1.0))
    simulation.run(prepare(settings), create_run_dir(tmp_path / "whole"), progress=False)

    def aggregate(server, rnd, updates, original=FederatedServer.aggregate):
        if rnd == 2:
            raise Crash
        return original(server, rnd, updates)

    run_dir = create_run_dir(tmp_path / "crashed")
    exp = prepare(settings)
    with monkeypatch.context() as patch:
        patch.setattr(FederatedServer, "aggregate", aggregate)
        with pytest.raises(Crash):
            simulation.run(exp, run_dir, progress=False)
    assert checkpoint.open_resume(run_dir)[1].round == 1
    resume_in_process(run_dir)
    assert_same_run(tmp_path / "whole", run_dir)
    assert [r["privacy"]["epsilon"] for r in read_metrics(run_dir)] == [
        r["privacy"]["epsilon"] for r in read_metrics(tmp_path / "whole")
    ]


def test_the_flower_apps_run_the_private_run_of_the_simulation_and_stop_at_its_budget(
    tiny_settings, tmp_path, monkeypatch
):
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    from tests.test_flower_strategy import LoopbackGrid, node_configs, run_server

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    budget = epsilon(2, 2.0, 3, 3, 1 / 3**1.1) * 1.001
    raw = with_privacy(tiny_settings, "zeropad", clip=0.5, noise_multiplier=2.0, epsilon_budget=budget)
    raw["lora"].update(tiers=[1, 2, 4])
    settings = validate_settings(raw)
    out = run_server(LoopbackGrid(node_configs()), settings, tmp_path)
    sim = tmp_path / "sim"
    simulation.run(prepare(settings), create_run_dir(sim), progress=False)
    a, b = (
        load_file(out / "checkpoint/adapter.safetensors"),
        load_file(sim / "checkpoint/adapter.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["privacy"] for r in read_metrics(out)] == [r["privacy"] for r in read_metrics(sim)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["stopped"].startswith("privacy budget: round 3")


def test_the_cli_line_says_the_epsilon_spent_and_why_a_run_stopped():
    from hlora.federation.metrics import privacy_line

    assert privacy_line({"rounds": 3}) is None
    summary = {
        "rounds": 2,
        "privacy": {"epsilon": 54.09, "delta": 0.0063, "noise_multiplier": 1.0, "clip": 1.0, "clipped": 7},
    }
    want = "(epsilon 54.09, delta 0.0063) after 2 rounds, z 1, C 1; 7 updates clipped"
    assert privacy_line(summary) == want
    summary["stopped"] = "the privacy budget"
    assert privacy_line(summary).endswith("; stopped: the privacy budget")
    summary["privacy"]["epsilon"] = None
    assert privacy_line(summary).startswith("(epsilon unbounded (no noise), delta")


@pytest.mark.parametrize(("target", "releases"), [(8.0, 1), (3.0, 1), (20.0, 4)])
def test_the_noise_for_a_target_epsilon_is_the_smallest_that_keeps_it(target, releases):
    from hlora.privacy.accountant import noise_for_epsilon

    z = noise_for_epsilon(target, 30, 5, 50, 1e-3, releases)
    assert epsilon(30, z, 5, 50, 1e-3, releases) <= target
    assert epsilon(30, z - 0.002, 5, 50, 1e-3, releases) > target  # 0.001 below would not do
    assert z == round(z, 3)
    with pytest.raises(ValueError, match="target epsilon must be > 0"):
        noise_for_epsilon(0.0, 30, 5, 50, 1e-3)


def test_hlora_privacy_shows_the_epsilon_by_round_and_the_noise_for_a_target(capsys):
    from hlora.cli.main import main

    args = ["privacy", "--set", "federation.num_clients=100", "--set", "federation.clients_per_round=20"]
    args += ["--set", "federation.rounds=30", "--set", "privacy.clip=1.0"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--set", "privacy.noise_multiplier=1.0", "--epsilon", "8"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    delta = 100**-1.1
    assert "20 of 100 clients a round (sampled without replacement)" in out
    by_round = [f"{epsilon(r, 1.0, 20, 100, delta):.4g}" for r in (10, 30)]
    assert f"z 1 (config): {', '.join(by_round)}" in out
    z = float(out.split("--set privacy.noise_multiplier=")[1].split()[0])
    assert epsilon(30, z, 20, 100, delta) <= 8 < epsilon(30, z - 0.002, 20, 100, delta)
    assert "noise std 0.05 on the mean" in out
    with pytest.raises(SystemExit) as info:
        main(args)  # neither noise nor a target
    assert info.value.code == 2
    assert "nothing to account" in capsys.readouterr().err
