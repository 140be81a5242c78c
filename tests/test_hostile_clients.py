"""A client that lies cannot steer the server: it aggregates with the data sizes it knows (not the ones
clients claim), refuses an update that changes far more than the round's others (a boosted update),
and no reply of any kind makes it raise (issue 18)."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hlora.aggregation import registry
from hlora.aggregation.base import client_weights
from hlora.config import FederationSettings
from hlora.errors import AggregationError
from hlora.federation.server import FederatedServer
from hlora.federation.validation import REASONS, lower_median, update_norm
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("layer.0.query", "layer.1.value")
M, N = 8, 6
HEAD = "classifier.weight"
SIZES = {0: 10, 1: 20, 2: 30, 3: 40}  # what the server's partition gave each client


def initial(rank: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(5)
    factors = {name: LoraFactors(torch.zeros(M, rank), torch.randn(rank, N, generator=g)) for name in LAYERS}
    return AdapterWeights(factors, {HEAD: torch.randn(2, N, generator=g)})


def server(method: str = "hlora", clients: int = 3, **kw) -> FederatedServer:
    ranks = {cid: (2 if method == "fedit" else 2 ** (cid % 3 + 1)) for cid in range(clients)}
    agg = registry.create(method, bank_rank=max(ranks.values()), seed=0)
    kw.setdefault("client_sizes", {cid: SIZES[cid] for cid in ranks})
    return FederatedServer(agg, initial(max(ranks.values())), ranks, clients, seed=0, **kw)


def trained(plan: ClientPlan, seed: int, boost: float = 1.0) -> AdapterWeights:
    """What local training could return: each tensor that trains moved by about 0.1 per entry, times
    `boost`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in plan.adapter.tensors().items():
        frozen = name.endswith(".lora_A") and not plan.train_a
        out[name] = t if frozen else t + boost * 0.1 * torch.randn(t.shape, generator=g)
    return AdapterWeights.from_tensors(out)


def replies(plans: dict[int, ClientPlan], seed: int = 0, claims=None, boost=None) -> list[ClientUpdate]:
    """Every client's update: the sample count it claims (default: the true one) and its boost."""
    claims, boost = claims or {}, boost or {}
    return [
        ClientUpdate(cid, claims.get(cid, SIZES[cid]), trained(plan, 100 * seed + cid, boost.get(cid, 1.0)))
        for cid, plan in plans.items()
    ]


def snapshot(srv: FederatedServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in srv.global_weights.tensors().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def change(plan: ClientPlan, update: ClientUpdate) -> float:
    return update_norm(plan.uplink(update.weights), plan.uplink(plan.adapter))


def play(srv: FederatedServer, rnd: int, **kw):
    return srv.aggregate(rnd, replies(srv.configure(rnd), seed=rnd, **kw))


# --- weights the server knows -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", registry.names())
@pytest.mark.parametrize("claim", [1e300, 1, 10**30, 0.5])
def test_a_claimed_sample_count_changes_nothing(method, claim, caplog):
    honest, liar = server(method), server(method)
    for srv in (honest, liar):
        play(srv, 1)
    with caplog.at_level(logging.WARNING, logger="hlora"):
        outcome = play(liar, 2, claims={1: claim})
    play(honest, 2)
    assert same(snapshot(liar), snapshot(honest))
    assert outcome.accepted == (0, 1, 2) and not outcome.rejected and outcome.misreported == {1: claim}
    assert [r.getMessage() for r in caplog.records] == [
        f"round 2: client 1 claims {claim} training samples, the server's partition gave it 20: "
        "weighted by 20"
    ]
    assert play(liar, 3).misreported == {}


def test_claims_that_overflow_the_sum_aggregate_normally():
    honest, liars = server(), server()
    play(honest, 1)
    outcome = play(liars, 1, claims={0: 1.7e308, 2: 1.7e308})
    assert not outcome.failed and same(snapshot(liars), snapshot(honest))
    assert outcome.misreported == {0: 1.7e308, 2: 1.7e308}


def test_client_weights_never_overflow():
    def update(cid: int, n: float) -> ClientUpdate:
        return ClientUpdate(cid, n, AdapterWeights({}, {}))  # type: ignore[arg-type]

    assert client_weights([update(0, 1.7e308), update(1, 1.7e308)]) == [0.5, 0.5]
    assert client_weights([update(0, 1e300), update(1, 3e300)]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        client_weights([update(0, 10**400)])


def test_the_server_needs_a_size_for_every_client():
    with pytest.raises(ValueError, match="client_sizes"):
        server(client_sizes={0: 10, 1: 20})
    with pytest.raises(ValueError, match="client_sizes"):
        server(client_sizes={0: 10, 1: 20, 2: 0})


def test_an_aggregation_error_fails_the_round_instead_of_raising(monkeypatch, caplog):
    srv = server("flora")
    play(srv, 1)
    before, state = snapshot(srv), srv.aggregator.state_dict()
    real = srv.aggregator.aggregate

    def broken(global_weights, updates):
        real(global_weights, updates)  # FLoRA appends its stack, then the method gives up
        raise AggregationError("flora cannot aggregate layer.0.query: no")

    monkeypatch.setattr(srv.aggregator, "aggregate", broken)
    with caplog.at_level(logging.WARNING, logger="hlora"):
        outcome = play(srv, 2)
    assert outcome.failed and "flora cannot aggregate layer.0.query: no" in outcome.reason
    assert same(snapshot(srv), before) and srv.aggregator.state_dict() == state and srv.version == 1
    assert "round 2 failed" in caplog.text


def test_a_numeric_failure_in_the_method_fails_the_round_instead_of_raising(monkeypatch):
    srv = server()
    before = snapshot(srv)

    def lapack_gives_up(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", lapack_gives_up)
    outcome = play(srv, 1)
    assert outcome.failed
    assert outcome.reason == "hlora could not aggregate: linalg.svd: The algorithm failed to converge"
    assert same(snapshot(srv), before) and srv.version == 0


# --- a default bound against boosted updates --------------------------------------------------------------


def test_lower_median():
    assert lower_median([3.0]) == 3.0
    assert lower_median([5.0, 1.0]) == 1.0  # of two, the smaller: one boosted client of two is caught
    assert lower_median([4.0, 1.0, 9.0]) == 4.0
    assert lower_median([4.0, 1.0, 9.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        lower_median([])


def test_outlier_is_a_reason():
    assert "outlier" in REASONS


@pytest.mark.parametrize("clients", [2, 3, 4])
@pytest.mark.parametrize("method", registry.names())
def test_a_boosted_update_is_refused_by_default(method, clients):
    factor = FederationSettings().update_norm_factor
    srv, reference = server(method, clients, update_norm_factor=factor), server(method, clients)
    plans = srv.configure(1)
    reference.configure(1)
    updates = replies(plans, boost={1: 1e3})
    outcome = srv.aggregate(1, updates)
    assert list(outcome.rejected) == [1] and outcome.rejected[1].code == "outlier"
    assert "update_norm_factor" in outcome.rejected[1].detail
    assert 1 not in outcome.accepted and 1 not in outcome.update_norms
    # the result is that of the honest clients alone
    reference.aggregate(1, [u for u in updates if u.client_id != 1])
    assert same(snapshot(srv), snapshot(reference))


def test_honest_updates_of_every_size_pass_and_inf_switches_the_bound_off():
    factor = FederationSettings().update_norm_factor
    srv = server(clients=4, update_norm_factor=factor)
    # honest clients differ: one moves 5 times as far as another
    assert not play(srv, 1, boost={0: 0.5, 3: 2.5}).rejected
    off = server(clients=4, update_norm_factor=math.inf)
    assert not play(off, 1, boost={1: 1e3}).rejected


def test_the_bound_is_relative_to_the_lower_median():
    srv = server(clients=3, update_norm_factor=4.0)
    plans = srv.configure(1)
    norms = {u.client_id: change(plans[u.client_id], u) for u in replies(plans)}
    reference = lower_median(norms.values())
    # scale client 2's change to just above, then just below, 4 x the reference
    for scale, refused in ((1.01, True), (0.99, False)):
        srv = server(clients=3, update_norm_factor=4.0)
        plans = srv.configure(1)
        boost = {2: 4.0 * reference * scale / norms[2]}
        outcome = srv.aggregate(1, replies(plans, boost=boost))
        assert (2 in outcome.rejected) is refused, (scale, outcome)


def test_the_default_factor_fits_the_committed_run_records():
    """Over every round of every committed run (`results/**/metrics.jsonl`, `client_update_norm`): no
    honest update is above the default factor times its round's lower median, and any one update
    boosted 1e3 times is."""
    script = ROOT / "scripts" / "update_norm_factor.py"
    spec = importlib.util.spec_from_file_location("update_norm_factor", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rounds = module.round_norms(ROOT / "results")
    assert len(rounds) >= 100  # the records are there
    factor = FederationSettings().update_norm_factor
    honest, boosted = module.ratios(rounds, boost=1e3)
    assert max(honest) * 2 <= factor < min(boosted) / 2  # a margin both ways


# --- no reply makes the server raise ----------------------------------------------------------------------

ODD_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, 1.7e308, -0.0, 5e-324, 1e30, 1e-30, 1e3]),
)
# Mostly claims that pass validation (finite, > 0), so that rounds aggregate, and some that do not.
CLAIMS = st.one_of(
    st.sampled_from([10, 20, 30]),
    st.floats(5e-324, 1.7e308),
    st.integers(1, 10**30),
    st.one_of(ODD_FLOATS, st.integers(-10, 10**400), st.none(), st.text(max_size=3), st.booleans()),
)
# Mostly honest-sized changes, some huge (outliers, or all huge: an aggregate that overflows) or broken.
SCALES = st.one_of(st.floats(0.2, 5.0), st.sampled_from([1e18, 1e30, 1e36]), ODD_FLOATS)


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(registry.names()),
    factor=st.sampled_from([None, 20.0]),
    claims=st.lists(CLAIMS, min_size=3, max_size=3),
    scales=st.lists(SCALES, min_size=3, max_size=3),
    replied=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_no_reply_makes_the_server_raise(method, factor, claims, scales, replied):
    """Whatever sample count a client claims and however it scales its change (to huge, tiny, infinite
    or NaN), the round ends, with the global model finite and, if the round failed, unchanged."""
    srv = server(method, 3, update_norm_factor=factor)
    play(srv, 1)
    before = snapshot(srv)
    plans = srv.configure(2)
    updates = []
    for cid, plan in plans.items():
        if not replied[cid]:
            continue
        sent, moved = plan.adapter.tensors(), trained(plan, cid).tensors()
        scaled = {k: sent[k] + scales[cid] * (moved[k] - sent[k]) for k in sent}
        updates.append(ClientUpdate(cid, claims[cid], AdapterWeights.from_tensors(scaled)))
    outcome = srv.aggregate(2, updates)
    after = snapshot(srv)
    event(f"failed: {outcome.reason[:40]}" if outcome.failed else "aggregated")
    assert all(why.code in REASONS for why in outcome.rejected.values())
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    if outcome.failed:
        assert same(after, before) and srv.version == 1
    else:
        assert srv.version == 2 and set(outcome.accepted) <= {u.client_id for u in updates}

