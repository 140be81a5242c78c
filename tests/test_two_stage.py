"""Secure two-stage HLoRA (`hlora.secure.two_stage`, `hlora.federation.secure`): from secure sums alone,
the product mean's factors equal HLoRA's where the sketch covers the rank (mixed ranks, a client dropping
between the stages), a narrower sketch is a randomised SVD that power iterations sharpen, and a whole run
with `[secure]` ends where plain HLoRA does, records its traffic and resumes bit-identically, with no
`ClientUpdate` ever reaching the server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora import simulation
from hlora.aggregation.products import aggregate_products, dense_product_svd
from hlora.config import fingerprint, settings_to_toml
from hlora.errors import ConfigError
from hlora.federation import secure as engine_secure
from hlora.federation.prepared import prepare
from hlora.federation.round import RoundLoop
from hlora.federation.server import FederatedServer
from hlora.protocol import ClientUpdate
from hlora.rundir import create_run_dir, read_metrics
from hlora.secure.masking import secure_sum
from hlora.secure.two_stage import (
    StageRequest,
    plain_sum,
    respond,
    secure_two_stage,
)
from hlora.weights import AdapterWeights, LoraFactors
from tests.test_checkpoint import Crash, assert_same_run, configured, resume_in_process

M, N = 24, 20


def clients_of(ranks, seed, head=True):
    """Random adapters of the given ranks, one adapted weight `w` (M x N) and a small head."""
    g = torch.Generator().manual_seed(seed)
    return {
        cid: AdapterWeights(
            {"w": LoraFactors(torch.randn(M, r, generator=g), torch.randn(r, N, generator=g))},
            {"h": torch.randn(3, generator=g)} if head else {},
        )
        for cid, r in enumerate(ranks)
    }


def exchange_over(clients, drop=None, seen=None):
    """The runtime's part, in-process: each client answers on its side, the sum is `plain_sum`.
    `drop(stage, requests)` -> client ids that drop out of that sum; `seen` collects each sum's
    requests."""
    stage = {"i": 0}

    def exchange(requests):
        if seen is not None:
            seen.append(dict(requests))
        dropped = drop(stage["i"], requests) if drop is not None else ()
        stage["i"] += 1
        return plain_sum({cid: respond(clients[cid], r) for cid, r in requests.items()}, dropouts=dropped)

    return exchange


def weights_of(sizes):
    return {cid: n / sum(sizes.values()) for cid, n in sizes.items()}


def run_secure(clients, p, rank, q, **kw):
    return secure_two_stage(
        exchange_over(clients, kw.pop("drop", None)), p, {"w": (M, N)}, {"h": (3,)}, rank, q, 7, **kw
    )


def pairs(clients, ids):
    return [(clients[c].factors["w"].B.double(), clients[c].factors["w"].A.double()) for c in ids]


def assert_same_tiers(B, A, B_ref, A_ref, ranks, tol=1e-9):
    """The same products `B[:, :r] A[:r]` at every rank `r` a client holds (singular vectors are unique
    only up to sign, their products are not)."""
    for r in sorted(set(ranks)):
        got, want = B[:, :r] @ A[:r], B_ref[:, :r] @ A_ref[:r]
        assert torch.allclose(got, want, atol=tol * max(1.0, float(want.abs().max()))), r


@settings(deadline=None, derandomize=True, max_examples=12)
@given(
    ranks=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    sizes=st.lists(st.integers(1, 50), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    extra=st.integers(0, 2),
)
def test_with_q_covering_the_rank_the_factors_are_hlora_s(ranks, sizes, seed, extra):
    """Mixed ranks, q = the total client rank (the default) or more: every tier's product is HLoRA's
    (`aggregate_products`), the split is balanced, and the head is the weighted mean."""
    clients = clients_of(ranks, seed)
    p = weights_of({cid: sizes[cid] for cid in clients})
    bank = max(ranks) + 1
    out = run_secure(clients, p, bank, sum(ranks) + extra)
    B, A = out.factors["w"]
    B_ref, A_ref = aggregate_products(pairs(clients, sorted(clients)), [p[c] for c in sorted(p)], bank)
    assert_same_tiers(B, A, B_ref.double(), A_ref.double(), [*ranks, bank])
    assert torch.allclose(B.T @ B, A @ A.T, atol=1e-9)  # balanced: B^T B = A A^T = S
    head = sum(p[c] * clients[c].dense["h"].double() for c in clients)
    assert torch.allclose(out.head["h"], head, atol=1e-12)
    assert out.survivors == tuple(sorted(clients)) and len(out.stage_clients) == 2


def test_into_b_matches_flexlora_s_split():
    clients = clients_of([2, 3, 4], 1)
    p = weights_of({0: 3, 1: 5, 2: 2})
    B, A = run_secure(clients, p, 4, 9, split="into_b").factors["w"]
    B_ref, A_ref = dense_product_svd(pairs(clients, [0, 1, 2]), [p[0], p[1], p[2]], 4)
    assert_same_tiers(B, A, B_ref.double(), A_ref.double(), [2, 3, 4])
    assert torch.allclose(A @ A.T, torch.eye(4, dtype=A.dtype), atol=1e-9)  # A = V^T


def test_a_client_dropping_between_the_stages_leaves_the_mean_of_the_rest_exact():
    """Q spans every stage-1 client's B, so stage 2 over the survivors is exact for their renormalised
    mean: the dropped client's term is all that is lost."""
    ranks = [2, 4, 3, 1]
    clients = clients_of(ranks, 3)
    p = weights_of({0: 10, 1: 4, 2: 7, 3: 9})
    out = run_secure(clients, p, 4, sum(ranks), drop=lambda stage, _: (2,) if stage == 1 else ())
    assert out.stage_clients == [(0, 1, 2, 3), (0, 1, 3)] and out.survivors == (0, 1, 3)
    rest = [0, 1, 3]
    B_ref, A_ref = aggregate_products(pairs(clients, rest), [p[c] for c in rest], 4)  # renormalised inside
    assert_same_tiers(*out.factors["w"], B_ref.double(), A_ref.double(), [1, 2, 4])
    head = sum(p[c] * clients[c].dense["h"].double() for c in rest) / sum(p[c] for c in rest)
    assert torch.allclose(out.head["h"], head, atol=1e-12)


def test_too_few_survivors_is_a_value_error():
    clients = clients_of([2, 2], 0)
    with pytest.raises(ValueError, match="threshold"):
        run_secure(clients, weights_of({0: 1, 1: 1}), 2, 4, drop=lambda stage, req: tuple(req))


def test_below_the_rank_the_error_is_above_eckart_young_and_falls_with_power_iterations():
    """q below rank(dW) is a randomised range finder: its rank-r error is above the optimum (the tail
    of dW's spectrum) and power iterations bring it towards it (mean over seeds of the sketch)."""
    ranks = [4, 4, 4, 4]
    clients = clients_of(ranks, 11, head=False)
    p = weights_of({c: 1 for c in clients})
    dW = sum(p[c] * B @ A for c, (B, A) in zip(clients, pairs(clients, sorted(clients)), strict=True))
    rank, q = 4, 6
    optimum = float(torch.linalg.svdvals(dW)[rank:].square().sum().sqrt())
    ratios = []
    for iters in (0, 1, 3):
        errs = []
        for seed in range(8):
            out = secure_two_stage(
                exchange_over(clients), p, {"w": (M, N)}, {}, rank, q, seed, power_iterations=iters
            )
            B, A = out.factors["w"]
            errs.append(float(torch.linalg.norm(dW - B @ A)) / optimum)
        ratios.append(float(np.mean(errs)))
    assert all(r >= 1 - 1e-12 for r in ratios)
    assert ratios[0] > ratios[1] > ratios[2] and ratios[0] > 1.01
    # and with q covering the rank, the optimum itself
    out = secure_two_stage(exchange_over(clients), p, {"w": (M, N)}, {}, rank, sum(ranks), 0)
    B, A = out.factors["w"]
    assert float(torch.linalg.norm(dW - B @ A)) / optimum == pytest.approx(1.0, abs=1e-9)


def test_a_seeded_sketch_sends_only_its_seed_and_each_party_builds_the_same_omega():
    clients = clients_of([2, 3], 0)
    seen = []
    secure_two_stage(exchange_over(clients, seen=seen), weights_of({0: 1, 1: 1}), {"w": (M, N)}, {}, 3, 5, 42)
    first = seen[0][0]
    assert first.matrices is None and first.sketch_seed == 42
    assert first.downlink_bytes() == 8 + 8 + 4  # p_k, the seed, one q
    assert np.array_equal(respond(clients[0], first), respond(clients[0], seen[0][0]))
    project = seen[1][0]
    assert project.downlink_bytes() == 8 + M * 5 * 8  # p_k and Q in float64


def test_plain_sum_shows_the_server_the_total_alone():
    inputs = {0: np.arange(3.0), 1: np.ones(3), 2: np.full(3, 5.0)}
    out = plain_sum(inputs, dropouts=(2,), threshold=2)
    assert out.survivors == (0, 1) and np.array_equal(out.total, [1.0, 2.0, 3.0])
    assert set(out.server_view) == {"total"} and out.bytes_up == {0: 24, 1: 24}
    with pytest.raises(ValueError, match="threshold is 3"):
        plain_sum(inputs, dropouts=(2,), threshold=3)


# --- settings ------------------------------------------------------------------------------------------


def secure_settings(tiny_settings, **secure):
    return configured(tiny_settings, "hlora", secure={"enabled": True, **secure})


def test_without_secure_the_recorded_config_and_fingerprint_are_as_before(tiny_settings):
    assert "[secure]" not in settings_to_toml(tiny_settings)
    assert "secure" not in json.dumps(engine_fingerprinted(tiny_settings))
    on = tiny_settings.model_copy(
        update={"secure": tiny_settings.secure.model_copy(update={"enabled": True})}
    )
    assert fingerprint(on) != fingerprint(tiny_settings)


def engine_fingerprinted(s):
    from hlora.config import fingerprinted

    return fingerprinted(s)


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("fedit", {}, "secure.enabled: method 'fedit' cannot be computed from sums"),
        ("hlora", {"faults": {"corrupt": 0.1}}, "secure.enabled with faults.corrupt > 0"),
        ("hlora", {"secure": {"enabled": True, "sketch_rank": 2}}, "secure.sketch_rank (2) is below"),
        ("hlora", {"secure": {"enabled": True, "threshold": 3}}, "secure.threshold (3) exceeds"),
    ],
)
def test_settings_secure_cannot_serve_are_refused_in_one_line(tiny_settings, method, extra, message):
    raw = configured(tiny_settings, method).model_dump()
    raw["secure"] = {"enabled": True}
    for section, values in extra.items():
        raw[section].update(values)
    from hlora.config import validate_settings

    with pytest.raises(ConfigError) as e:
        validate_settings(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_runtime_without_the_secure_exchange_is_refused(tiny_settings, tmp_path):
    exp = prepare(secure_settings(tiny_settings))
    with pytest.raises(ConfigError, match="does not carry secure aggregation yet"):
        RoundLoop(exp, create_run_dir(tmp_path / "run"))  # what the Flower runtime builds
    assert list((tmp_path / "run").iterdir()) == []


def test_the_masked_sum_moves_one_round_by_the_fixed_point_alone():
    """Through the real pairwise-mask summation (fixed point at 2^-24), one round's product mean is
    HLoRA's within a few units of the resolution, where `plain_sum` gives it to round-off."""
    clients = clients_of([2, 4, 2, 4], seed=3)
    p = weights_of({cid: 10 + cid for cid in clients})
    pairs = [(c.factors["w"].B.double(), c.factors["w"].A.double()) for c in clients.values()]
    Bh, Ah = aggregate_products(pairs, list(p.values()), 4)

    def masked(requests):
        return secure_sum({cid: respond(clients[cid], r) for cid, r in requests.items()})

    out = secure_two_stage(masked, p, {"w": (M, N)}, {"h": (3,)}, 4, 12, 7)
    B, A = out.factors["w"]
    err = (B @ A - Bh @ Ah).abs().max().item()
    assert err < 64 * 2.0**-24 * len(clients) * (Bh @ Ah).abs().max().item() + 64 * 2.0**-24
    assert err > 0  # the fixed point is there: this is the masked path, not a float sum


# --- whole runs on the tiny model ----------------------------------------------------------------------


def test_a_secure_run_ends_where_hlora_does_and_the_server_sees_no_update(
    tiny_settings, tmp_path, monkeypatch
):
    plain = prepare(configured(tiny_settings, "hlora"))
    simulation.run(plain, create_run_dir(tmp_path / "plain"), progress=False)

    given_to_server = []

    def aggregate(server, rnd, updates):
        raise AssertionError("a secure round must not hand the server updates")

    def adopt(server, *args, original=FederatedServer.adopt):
        given_to_server.append(args)
        return original(server, *args)

    sums = []

    def recording_sum(inputs, **kw):  # the pairwise-mask summation the runs use
        sums.append({cid: type(v) for cid, v in inputs.items()})
        return secure_sum(inputs, **kw)

    exchanged = []
    real_play = engine_secure.SecureRound.play

    def play(self, rnd, plans, trained, exchange):
        def spy(requests):
            exchanged.append(list(requests.values()))
            return exchange(requests)

        return real_play(self, rnd, plans, trained, spy)

    secure = prepare(secure_settings(tiny_settings))
    with monkeypatch.context() as patch:
        patch.setattr(FederatedServer, "aggregate", aggregate)
        patch.setattr(FederatedServer, "adopt", adopt)
        patch.setattr(engine_secure.SecureRound, "play", play)
        simulation.run(secure, create_run_dir(tmp_path / "secure"), progress=False, summation=recording_sum)

    # Fixed point at 2^-24 perturbs each round's sums by ~1e-7 (see
    # test_the_masked_sum_moves_one_round_by_the_fixed_point_alone), and the clients' AdamW steps carry
    # that into the next rounds: compare what each tier holds (its product) and the head, not the
    # factors (singular vectors of nearly equal small singular values can turn).
    want, got = plain.server.global_weights, secure.server.global_weights
    assert want.tensors().keys() == got.tensors().keys()
    for rank in sorted(set(secure.client_ranks.values())):
        for layer, f in want.truncate(rank).factors.items():
            g = got.truncate(rank).factors[layer]
            assert torch.allclose(g.B @ g.A, f.B @ f.A, atol=1e-5, rtol=0), (rank, layer)
    for name, t in want.dense.items():
        assert torch.allclose(got.dense[name], t, atol=1e-5, rtol=0), name
    assert secure.server.version == plain.server.version == 3

    # the server's side was given adapters made from sums and client ids, never an update
    flat = [a for args in given_to_server for a in args]
    assert not any(isinstance(a, ClientUpdate) for a in flat)
    assert all(isinstance(args[1], AdapterWeights) for args in given_to_server)
    assert all(isinstance(r, StageRequest) for reqs in exchanged for r in reqs)
    assert sums and all(t is np.ndarray for s in sums for t in s.values())

    rows, plain_rows = read_metrics(tmp_path / "secure"), read_metrics(tmp_path / "plain")
    for row, ref in zip(rows, plain_rows, strict=True):
        assert row["aggregated_clients"] == ref["aggregated_clients"] and not row["round_failed"]
        assert row["instruments"] is None and row["client_update_norm"] == {}
        # the stages' time is counted apart from training, and the round's parts still add up
        assert row["secure_s"] > 0 and "secure_s" not in ref and row["train_s"] > 0
        parts = row["train_s"] + row["secure_s"] + row["aggregate_s"] + row["instruments_s"]
        assert parts <= row["wall_s"] + 1e-9
        sec = row["secure"]
        assert sec["sketch_rank"] == sum(row["client_ranks"].values()) and sec["power_iterations"] == 0
        assert len(sec["stage_clients"]) == 2
        # what travelled: per client, the sketch up (m x q per weight) and the projection with the head
        q = sec["sketch_rank"]
        shapes = [(f.B.shape[0], f.A.shape[1]) for f in secure.server.global_weights.factors.values()]
        head = sum(t.numel() for t in secure.server.global_weights.dense.values())
        up = 8 * (sum(q * m for m, _ in shapes) + sum(q * n for _, n in shapes) + head)
        # plus, for each of the 2 secure sums, the client's keys, its encrypted shares for each peer and
        # its unmasking shares (hlora.secure.masking): a few hundred bytes with 2 peers
        sent = row["client_uplink_bytes"].values()
        assert len(set(sent)) == 1 and up < next(iter(sent)) < up + 2 * 1024
        assert row["uplink_bytes"] == sum(sent)
        assert row["downlink_bytes"] > ref["downlink_bytes"]  # Q comes down on top of the plan


def test_a_secure_run_crashed_in_round_2_resumes_bit_identically(tiny_settings, tmp_path, monkeypatch):
    settings = secure_settings(tiny_settings, power_iterations=1)
    # the default summation, as the resume uses (the masked one once it is installed)
    simulation.run(prepare(settings), create_run_dir(tmp_path / "whole"), progress=False)

    def play(self, rnd, *args, original=engine_secure.SecureRound.play):
        if rnd == 2:
            raise Crash
        return original(self, rnd, *args)

    run_dir = create_run_dir(tmp_path / "crashed")
    with monkeypatch.context() as patch:
        patch.setattr(engine_secure.SecureRound, "play", play)
        with pytest.raises(Crash):
            simulation.run(prepare(settings), run_dir, progress=False)
    assert len(read_metrics(run_dir)) == 1
    resume_in_process(run_dir)
    assert [row["round"] for row in read_metrics(run_dir)] == [1, 2, 3]
    assert all(len(row["secure"]["stage_clients"]) == 4 for row in read_metrics(run_dir))
    assert_same_run(tmp_path / "whole", run_dir)


# --- the engine on its own -----------------------------------------------------------------------------


def engine(min_clients=1, stage_dropouts="renormalise"):
    from hlora.aggregation import registry
    from hlora.config import SecureSettings

    init = clients_of([4], 99)[0]
    ranks, sizes = {0: 2, 1: 4, 2: 3}, {0: 10, 1: 30, 2: 20}
    server = FederatedServer(
        registry.create("hlora", bank_rank=4),
        init,
        ranks,
        3,
        seed=0,
        min_clients=min_clients,
        client_sizes=sizes,
    )
    settings = SecureSettings(enabled=True, stage_dropouts=stage_dropouts)
    return server, engine_secure.SecureRound(server, settings), sizes


def test_the_engine_adopts_the_survivors_mean_and_counts_them_as_aggregated():
    server, secure, sizes = engine()
    plans = server.configure(1)
    trained = clients_of([2, 4, 3], 5)
    done = secure.play(1, plans, [0, 1, 2], exchange_over(trained, drop=lambda i, _: (1,) if i == 1 else ()))
    assert done.outcome.accepted == (0, 2) and done.outcome.missing == (1,) and not done.outcome.failed
    assert done.record["stage_clients"] == [[0, 1, 2], [0, 2]] and server.version == 1
    B_ref, A_ref = aggregate_products(pairs(trained, [0, 2]), [sizes[0], sizes[2]], 4)
    g = server.global_weights
    assert_same_tiers(
        g.factors["w"].B.double(), g.factors["w"].A.double(), B_ref.double(), A_ref.double(), [2, 3, 4], 1e-5
    )
    # client 1 sent its sketch and then nothing: its uplink is stage 1's alone
    assert done.traffic.uplink_bytes_by_client[1] == 8 * M * 9
    assert done.traffic.uplink_bytes_by_client[0] == 8 * (M * 9 + 9 * N + 3)


def test_by_default_a_client_dropping_between_the_sums_fails_the_round():
    """Its stage-1 sketch is in the first sum and not in the last: adopting the result would let the
    server read that sketch off the difference, so the round fails and the global model stays."""
    server, secure, _ = engine(stage_dropouts="fail")
    before = server.global_weights.tensors()
    plans = server.configure(1)
    trained = clients_of([2, 4, 3], 5)
    done = secure.play(1, plans, [0, 1, 2], exchange_over(trained, drop=lambda i, _: (1,) if i == 1 else ()))
    assert done.outcome.failed and "client(s) [1] dropped between the secure sums" in done.outcome.reason
    assert done.record["stage_clients"] == [[0, 1, 2], [0, 2]] and server.version == 0
    assert all(torch.equal(before[k], v) for k, v in server.global_weights.tensors().items())
    # without a dropout the same round goes through
    plans = server.configure(2)
    assert not secure.play(2, plans, [0, 1, 2], exchange_over(trained)).outcome.failed


def test_a_round_whose_sums_cannot_be_made_fails_and_keeps_the_global_model():
    server, secure, _ = engine(min_clients=2)
    before = server.global_weights.tensors()
    plans = server.configure(1)
    trained = clients_of([2, 4, 3], 5)
    done = secure.play(
        1, plans, [0, 1, 2], exchange_over(trained, drop=lambda i, req: tuple(req) if i == 1 else ())
    )
    assert done.outcome.failed and "secure sums could not be made" in done.outcome.reason
    assert server.version == 0 and all(
        torch.equal(before[k], v) for k, v in server.global_weights.tensors().items()
    )
    plans = server.configure(2)  # too few survivors for min_clients
    done = secure.play(
        2, plans, [0, 1, 2], exchange_over(trained, drop=lambda i, _: (0, 1) if i == 1 else ())
    )
    assert done.outcome.failed and "min_clients is 2" in done.outcome.reason and server.version == 0
