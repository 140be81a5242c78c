"""Client-level DP with secure aggregation (distributed DP, `hlora.federation.secure`): each client clips
its own change and adds its share of the noise, the server sees only noised sums. Without noise the
secure run is the central DP run (same clipping, same fixed-weight estimator); with noise every sum is
counted by the accountant, and a client's contribution is its clipped change plus a share of the right
size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hlora import simulation
from hlora.config import validate_settings
from hlora.errors import ConfigError
from hlora.federation.metrics import privacy_line
from hlora.federation.prepared import prepare
from hlora.federation.secure import contribution
from hlora.privacy.accountant import epsilon
from hlora.rundir import create_run_dir, read_metrics
from hlora.secure.masking import ServerView, default_threshold, secure_sum
from hlora.secure.two_stage import StageRequest, orthonormal_basis, plain_sum, respond
from hlora.weights import AdapterWeights
from tests.test_privacy import SHAPES, toy_round, with_privacy


def private_secure(tiny_settings, method="hlora", secure=None, **privacy):
    raw = with_privacy(tiny_settings, method, **privacy)
    raw["secure"] = {"enabled": True, **(secure or {})}
    return validate_settings(raw)


# --- the client's side ----------------------------------------------------------------------------------


def full_projection(adapter: AdapterWeights, weight: float, **private) -> StageRequest:
    """A stage-2 request whose bases are complete orthonormal ones (`Q` square): it keeps every norm."""
    g = torch.Generator().manual_seed(11)
    bases = {
        name: orthonormal_basis(torch.randn(m, m, generator=g, dtype=torch.float64))
        for name, (m, _) in SHAPES.items()
    }
    return StageRequest("project", weight, matrices=bases, head=tuple(adapter.dense), **private)


@pytest.mark.parametrize("clip", [0.1, 1e6])
def test_a_clients_contribution_is_its_change_clipped_to_c_and_weighted(clip):
    _, _, plans, updates = toy_round("hlora", {0: 2, 1: 4})
    plan, trained = plans[1], updates[1].weights
    request = full_projection(trained, 0.25, clip=clip)
    got = contribution(trained, plan, request)
    # the change's norm in product space and head, through the norm-keeping projection
    plain = StageRequest("project", 1.0, matrices=request.matrices, head=request.head)
    change = respond(trained, plain) - respond(plan.adapter, plain)
    norm = float(np.linalg.norm(change))
    assert norm > 0.1  # the small clip bites
    assert np.linalg.norm(got) == pytest.approx(0.25 * min(norm, clip), rel=1e-9)
    assert np.allclose(got, 0.25 * min(1, clip / norm) * change, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="private stage request"):
        respond(trained, request)  # the plain answer is refused for a private request


def test_a_clients_noise_share_has_its_standard_deviation_and_its_seed():
    _, _, plans, _ = toy_round("hlora", {0: 2, 1: 4})
    plan = plans[0]
    unchanged = plan.adapter  # no change: the contribution is the noise share alone
    request = full_projection(unchanged, 0.5, clip=1.0, noise_std=0.3, noise_seed=5)
    share = contribution(unchanged, plan, request)
    assert share.size > 40 and np.std(share) == pytest.approx(0.3, rel=0.35)
    assert np.array_equal(share, contribution(unchanged, plan, request))
    wide = {n: torch.eye(n_cols, dtype=torch.float64) for n, (_, n_cols) in SHAPES.items()}
    big = StageRequest("sketch", 0.5, matrices=wide, clip=1.0, noise_std=0.3, noise_seed=None)
    draws = [contribution(unchanged, plan, big) for _ in range(2)]
    assert not np.array_equal(*draws)  # the client's own OS randomness
    assert np.std(np.concatenate(draws)) == pytest.approx(0.3, rel=0.35)


# --- the accountant ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("releases", [2, 4])
def test_k_noised_sums_a_round_cost_one_gaussian_at_z_over_root_k(releases):
    z, delta = 1.5, 1e-3
    assert epsilon(6, z, 4, 10, delta, releases) == pytest.approx(
        epsilon(6, z / math.sqrt(releases), 4, 10, delta), rel=1e-12
    )
    assert epsilon(6, z, 4, 10, delta, releases) > epsilon(6, z, 4, 10, delta)


# --- settings ----------------------------------------------------------------------------------------------


def test_privacy_with_secure_aggregation_is_taken_for_the_product_rules(tiny_settings):
    for method in ("hlora", "flexlora"):
        s = private_secure(tiny_settings, method, clip=1.0, noise_multiplier=1.0)
        assert s.secure.enabled and s.privacy.enabled
    with pytest.raises(ConfigError) as e:  # a linear rule has no secure path, private or not
        private_secure(tiny_settings, "zeropad", clip=1.0, noise_multiplier=1.0)
    assert "secure.enabled: method 'zeropad'" in str(e.value) and "\n" not in str(e.value)


# --- runs --------------------------------------------------------------------------------------------------


def tier_products(weights: AdapterWeights, ranks) -> dict:
    return {
        (r, layer): f.B.double() @ f.A.double()
        for r in sorted(set(ranks))
        for layer, f in weights.truncate(r).factors.items()
    }


@pytest.mark.parametrize("clip", [0.02, 100.0])
def test_without_noise_the_secure_run_is_the_central_private_run(tiny_settings, tmp_path, clip):
    """The same clipped changes, the same fixed weights, the same mean of what was sent: from sums alone
    (the sketch covering the rank), the server gets the central mechanism's global adapter."""
    central = prepare(validate_settings(with_privacy(tiny_settings, clip=clip, noise_multiplier=0.0)))
    simulation.run(central, create_run_dir(tmp_path / "central"), progress=False)
    secure = prepare(private_secure(tiny_settings, clip=clip, noise_multiplier=0.0))
    simulation.run(secure, create_run_dir(tmp_path / "secure"), progress=False, summation=plain_sum)

    ranks = secure.client_ranks.values()
    want = tier_products(central.server.global_weights, ranks)
    got = tier_products(secure.server.global_weights, ranks)
    for key, product in want.items():
        assert torch.allclose(got[key], product, atol=1e-6, rtol=0), key
    for name, t in central.server.global_weights.dense.items():
        assert torch.allclose(secure.server.global_weights.dense[name], t, atol=1e-6, rtol=0), name
    central_rows, rows = read_metrics(tmp_path / "central"), read_metrics(tmp_path / "secure")
    clipped = sum(r["privacy"]["clipped"] for r in central_rows)
    assert clipped > 0 if clip < 1 else clipped == 0  # the small clip bites, the large one does not
    assert all(r["privacy"]["clipped"] is None for r in rows)  # the server cannot tell


def test_a_noised_secure_run_counts_every_sum_and_the_server_sees_only_sums(tiny_settings, tmp_path):
    z, clip = 1.0, 0.05
    settings = private_secure(tiny_settings, clip=clip, noise_multiplier=z, secure={"power_iterations": 1})
    exp = prepare(settings)
    views = []

    def recording_sum(inputs, **kw):
        result = secure_sum(inputs, **kw)
        views.append(result.server_view)
        return result

    run_dir = create_run_dir(tmp_path / "run")
    summary = simulation.run(exp, run_dir, progress=False, summation=recording_sum)
    rows = read_metrics(run_dir)
    fed = settings.federation
    delta = settings.privacy.resolved_delta(fed.num_clients)
    for row in rows:
        p = row["privacy"]
        # 4 noised sums a round: the sketch, the power iteration's two, the projection
        want = epsilon(row["round"], z, fed.clients_per_round, fed.num_clients, delta, 4)
        assert p["epsilon"] == pytest.approx(want, rel=1e-12)
        assert p["sigma"] == pytest.approx(z * clip / fed.clients_per_round)
        assert p["noise_shares"] == default_threshold(fed.clients_per_round)
        assert p["clipped"] is None and p["aggregated"] == fed.clients_per_round
        assert len(row["secure"]["stage_clients"]) == 4
    # what the server received: SecAgg's messages, each client's input only masked (uniform 64-bit words)
    assert len(views) == 4 * len(rows)
    assert all(isinstance(v, ServerView) and len(v.masked_inputs) == fed.clients_per_round for v in views)
    assert all(y.dtype == np.uint64 for v in views for y in v.masked_inputs.values())
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["privacy"]["clipped"] is None
    assert "clipped by the clients" in privacy_line(saved)

    # the noise is there: the same run without it ends elsewhere, by about what sigma says
    quiet = prepare(
        private_secure(tiny_settings, clip=clip, noise_multiplier=0.0, secure={"power_iterations": 1})
    )
    simulation.run(quiet, create_run_dir(tmp_path / "quiet"), progress=False)
    a, b = exp.server.global_weights.dense, quiet.server.global_weights.dense
    assert any(not torch.allclose(a[n], b[n], atol=1e-4) for n in a)
    assert summary["rounds"] == len(rows)


def test_a_private_secure_round_reproduces_from_its_seed_unless_the_noise_is_the_clients_own(
    tiny_settings, tmp_path
):
    def final(name, **privacy):
        exp = prepare(private_secure(tiny_settings, clip=0.05, noise_multiplier=1.0, **privacy))
        simulation.run(exp, create_run_dir(tmp_path / name), progress=False, summation=plain_sum)
        return exp.server.global_weights.dense

    a, b = final("a"), final("b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = final("c", secure_noise=True)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_hlora_privacy_counts_the_secure_sums_and_the_shares(capsys):
    from hlora.cli.main import main

    args = ["privacy", "--set", "federation.num_clients=100", "--set", "federation.clients_per_round=20"]
    args += ["--set", "privacy.clip=1.0", "--set", "privacy.noise_multiplier=1.0", "--rounds", "10"]
    args += ["--set", "federation.method=hlora", "--set", "lora.rank_policy=tiers"]
    args += ["--set", "lora.tiers=[2, 4]"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--set", "secure.enabled=true", "--set", "secure.power_iterations=1"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "4 noised releases a round (secure sums, distributed DP)" in out
    assert f"z 1 (config): {epsilon(10, 1.0, 20, 100, 100**-1.1, 4):.4g};" in out
    assert f"0.05 on the mean, {0.05 * math.sqrt(20 / 11):.3g} with all 20 clients' shares (t = 11)" in out


def test_a_later_sum_with_fewer_noise_shares_than_t_does_not_open(tiny_settings, tmp_path, caplog):
    """t = 3 of 5 shares carry sigma. Two clients drop out of the first sum (3 left, enough); one more
    out of the second: its 2 survivors are a majority of the 3 it asked, but 2 shares carry less noise
    than sigma, so the round's one threshold keeps the sum shut and the round fails."""
    raw = with_privacy(tiny_settings, clip=0.05, noise_multiplier=1.0)
    raw["federation"].update(num_clients=5, clients_per_round=5, rounds=1)
    raw["secure"] = {"enabled": True, "stage_dropouts": "renormalise"}
    exp = prepare(validate_settings(raw))
    calls = []

    def dropping_sum(inputs, *, threshold=None, **kw):
        calls.append((sorted(inputs), threshold))
        ids = sorted(inputs)
        dropouts = ids[:2] if len(calls) == 1 else ids[:1]
        return secure_sum(inputs, dropouts=dropouts, threshold=threshold, **kw)

    run_dir = create_run_dir(tmp_path / "run")
    simulation.run(exp, run_dir, progress=False, summation=dropping_sum)
    (row,) = read_metrics(run_dir)
    assert [t for _, t in calls] == [3, 3] and len(calls[1][0]) == 3
    assert row["round_failed"]
    assert "2 of 3 clients survive, fewer than the threshold t = 3" in caplog.text
    assert row["privacy"]["sigma"] is None  # nothing was released as a model
    assert row["privacy"]["clipped"] is None and row["privacy"]["aggregated"] == 0
