"""Plans and updates through Flower's records: what goes in comes out, only what the plan says travels,
and the bytes counted from the records are the simulation's traffic figures."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hlora.aggregation import registry
from hlora.config import validate_settings
from hlora.federation.prepared import prepare
from hlora.federation.reports import check_reports, planned_work
from hlora.federation.server import traffic
from hlora.flower.wire import (
    PLAN_ARRAYS,
    UPDATE_ARRAYS,
    WireError,
    array_tensor,
    decode_plan,
    decode_update,
    encode_plan,
    encode_update,
    record_bytes,
    tensor_array,
)
from hlora.protocol import ClientUpdate, TrainResult
from hlora.weights import AdapterWeights

# every method that serves mixed ranks: a new one is checked against the simulation without a line here
MIXED_RANK_METHODS = [m for m in registry.ordered() if not registry.get(m).equal_ranks]


def mixed(settings, method):
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"]["method"] = method
    return validate_settings(raw)


def trained(adapter: AdapterWeights, shift: float) -> AdapterWeights:
    """`adapter` as if a client had trained it: every tensor moved."""
    return AdapterWeights.from_tensors({k: t + shift for k, t in adapter.tensors().items()})


def result_of(weights: AdapterWeights, rows: int) -> TrainResult:
    return TrainResult(weights, rows, 2, 16, 0.69, 0.5, 0.1, 1234, state_bytes=567)


def plans_after_one_round(settings, method):
    """The round-0 global adapter and the plans of round 2, after a round in which every client sent a
    moved adapter (so FLoRA's plans carry a base delta)."""
    exp = prepare(mixed(settings, method))
    round0 = exp.server.global_weights
    plans = exp.server.configure(1)
    updates = [ClientUpdate(cid, 10 + cid, trained(p.adapter, 0.01 * (cid + 1))) for cid, p in plans.items()]
    assert not exp.server.aggregate(1, updates).failed
    return exp, round0, exp.server.configure(2)


@pytest.mark.parametrize("method", MIXED_RANK_METHODS)
def test_a_plan_comes_out_as_it_went_in_and_carries_only_its_downlink(tiny_settings, method):
    exp, round0, plans = plans_after_one_round(tiny_settings, method)
    sent = traffic(plans, [])
    for cid, plan in plans.items():
        content = encode_plan(plan, cid, 2, seed=1234)
        assert record_bytes(content.array_records[PLAN_ARRAYS]) == sent.downlink_bytes_by_client[cid]
        assert set(content.array_records[PLAN_ARRAYS]) == set(plan.downlink())
        got, header = decode_plan(content, round0)
        assert header == {"client-id": cid, "round": 2, "seed": 1234}
        assert (got.train_a, got.fresh, got.adapter.rank) == (plan.train_a, plan.fresh, exp.client_ranks[cid])
        want, have = plan.adapter.tensors(), got.adapter.tensors()
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) and want[k].dtype == have[k].dtype for k in want)
        assert [d.version for d in got.merge] == [d.version for d in plan.merge]
        for a, b in zip(got.merge, plan.merge, strict=True):
            assert all(torch.equal(a.weights.tensors()[k], t) for k, t in b.weights.tensors().items())
    if method == "flora":
        assert all(plan.merge for plan in plans.values())  # the case where deltas travel is covered


@pytest.mark.parametrize("method", ["hlora", "ffa"])
def test_an_update_comes_out_as_it_went_in_and_its_bytes_are_the_uplink(tiny_settings, method):
    exp, _, plans = plans_after_one_round(tiny_settings, method)
    for cid, plan in plans.items():
        weights = trained(plan.adapter, 0.5)
        if not plan.train_a:  # a frozen A comes back as it was sent
            factors = {k: type(f)(f.B, plan.adapter.factors[k].A) for k, f in weights.factors.items()}
            weights = AdapterWeights(factors, weights.dense)
        content = encode_update(plan, result_of(weights, 12))
        update, result = decode_update(content, cid, plan)
        assert update.client_id == cid and update.num_samples == 12
        assert result.mean_loss == pytest.approx(0.69) and result.peak_bytes == 1234
        assert result.state_bytes == 567
        want, have = weights.tensors(), update.weights.tensors()
        assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
        up = traffic({cid: plan}, [update]).uplink_bytes_by_client[cid]
        assert record_bytes(content.array_records[UPDATE_ARRAYS]) == up
        if method == "ffa":
            assert not any(k.endswith(".lora_A") for k in content.array_records[UPDATE_ARRAYS])


def test_a_reply_above_its_rank_decodes_and_the_server_refuses_it(tiny_settings):
    exp = prepare(mixed(tiny_settings, "hlora"))
    plans = exp.server.configure(1)
    cid = next(c for c, p in plans.items() if p.adapter.rank < 4)
    wide = exp.server.global_weights  # the bank rank, 4: above what the client was given
    content = encode_update(plans[cid], result_of(wide, 10))
    update, _ = decode_update(content, cid, plans[cid])
    outcome = exp.server.aggregate(1, [update])
    assert outcome.rejected[cid].code == "rank"


def test_what_is_not_an_update_raises_wire_error(tiny_settings):
    exp = prepare(mixed(tiny_settings, "hlora"))
    plan = exp.server.configure(1)[0]
    content = encode_update(plan, result_of(plan.adapter, 10))
    arrays = content.array_records[UPDATE_ARRAYS]
    name = next(k for k in arrays if k.endswith(".lora_B"))
    good = arrays[name]
    arrays[name] = type(good)(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-1])
    with pytest.raises(WireError, match="bytes"):
        decode_update(content, 0, plan)
    arrays[name] = type(good)(dtype=good.dtype, shape=good.shape, stype="numpy.ndarray", data=good.data)
    with pytest.raises(WireError, match="serialised"):
        decode_update(content, 0, plan)
    del arrays[name]  # a B without its A
    with pytest.raises(WireError, match="adapter"):
        decode_update(content, 0, plan)
    content.metric_records["hlora.train"]["steps"] = [1.0, 2.0]  # a list where a count belongs
    with pytest.raises(WireError, match="not an update"):
        decode_update(content, 0, plan)
    del content.metric_records["hlora.train"]
    with pytest.raises(WireError, match="not an update"):
        decode_update(content, 0, plan)


def test_figures_out_of_bounds_travel_as_sent_and_the_reports_check_names_them(tiny_settings):
    """The codec keeps a NaN loss, a 2^62-byte peak and a NaN count as sent (a bad figure does not make
    the update unreadable); `check_reports`, which `RoundLoop.finish` runs on every reply, names them."""
    exp = prepare(mixed(tiny_settings, "hlora"))
    plan = exp.server.configure(1)[0]
    rows = len(exp.partitions[0])
    sent = replace(result_of(plan.adapter, rows), mean_loss=math.nan, peak_bytes=2**62, steps=2)
    content = encode_update(plan, sent)
    content.metric_records["hlora.train"]["state-bytes"] = math.nan
    _, result = decode_update(content, 0, plan)
    assert math.isnan(result.mean_loss) and result.peak_bytes == 2**62 and math.isnan(result.state_bytes)
    work = planned_work(exp.settings.train, rows)
    checked, invalid = check_reports({0: result}, {0: work})
    assert invalid == {0: ["mean_loss", "peak_bytes", "state_bytes"]}
    assert checked[0].mean_loss is None and checked[0].peak_bytes is None and checked[0].wall_s == 0.5


def test_a_plan_with_tensors_it_does_not_use_is_refused(tiny_settings):
    exp = prepare(mixed(tiny_settings, "ffa"))
    round0 = exp.server.global_weights
    plan = exp.server.configure(1)[0]
    content = encode_plan(plan, 0, 1, seed=1)
    a_name = next(k for k in plan.adapter.tensors() if k.endswith(".lora_A"))
    content.array_records[PLAN_ARRAYS][a_name] = tensor_array(plan.adapter.tensors()[a_name])
    with pytest.raises(WireError, match="does not use"):
        decode_plan(content, round0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_float_dtype_travels_bit_for_bit(dtype):
    t = torch.randn(3, 5).to(dtype)
    a = tensor_array(t)
    assert len(a.data) == t.numel() * t.element_size()
    back = array_tensor("t", a)
    assert back.dtype == dtype and torch.equal(back, t)
