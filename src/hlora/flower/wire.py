"""Plans and updates as Flower records, and the bytes they put on the wire.

A plan travels as one `ArrayRecord` holding exactly `ClientPlan.downlink()` (the base deltas the node
lacks, the round's fold, and the adapter's parts it cannot rebuild) and one `ConfigRecord` saying what
the arrays are (rank, `train_a`, `fresh`, the delta versions, whether a fold travels, the round's seed).
The node rebuilds the rest of its adapter from the run's round-0 global adapter, which every party
derives from the run's seed. An update travels as the `ArrayRecord` of `ClientPlan.uplink()` and a
`MetricRecord` of its training figures.

Each tensor is one `Array` of its raw bytes (`stype` "torch.raw", little-endian, C order): every torch
dtype travels, bfloat16 included, and the bytes a message carries are exactly `tensor_bytes` of what it
holds, so traffic counted from the messages equals `hlora.federation.server.traffic`.

Decoding never trusts the sender: an array that is not what it claims to be raises `WireError`, which
the server turns into a rejection of that reply.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from hlora.protocol import BaseDelta, ClientPlan, ClientUpdate, TrainResult
from hlora.weights import AdapterWeights

STYPE = "torch.raw"
PLAN_ARRAYS = "hlora.downlink"  # RecordDict keys of a train message
PLAN_CONFIG = "hlora.plan"
UPDATE_ARRAYS = "hlora.uplink"  # and of its reply
UPDATE_METRICS = "hlora.train"
RUN_CONFIG = "hlora.config"  # in every train message: the run's resolved config, as TOML text
_MERGE = "merge."  # prefix of a base delta's tensors in `ClientPlan.downlink()`: merge.<version>.<name>
_FOLD = "fold."  # and of the round's fold (Fed-PLoRA): fold.<name>
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)
}


# The figures of an update's MetricRecord, and the TrainResult field each is
_FIGURES = {
    "num-samples": "num_samples",
    "steps": "steps",
    "samples-seen": "samples_seen",
    "mean-loss": "mean_loss",
    "wall-s": "wall_s",
    "step-s": "step_s",
    "peak-bytes": "peak_bytes",
    "state-bytes": "state_bytes",
}


class WireError(ValueError):
    """A record that does not decode into what it claims to be."""


def tensor_array(t: Tensor) -> Array:
    """One tensor as an `Array` of its raw bytes (a CPU copy, C order, little-endian)."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    if sys.byteorder != "little":  # pragma: no cover - every machine this runs on is little-endian
        raise RuntimeError("hlora.flower's wire format assumes a little-endian host")
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=STYPE, data=data)


def array_tensor(name: str, a: Array) -> Tensor:
    """The tensor an `Array` of `tensor_array` holds; WireError for one that is not such an array."""
    if a.stype != STYPE:
        raise WireError(f"{name} is serialised as {a.stype!r}, not {STYPE!r}")
    dtype = _DTYPES.get(a.dtype)
    if dtype is None:
        raise WireError(f"{name} has dtype {a.dtype!r}; allowed: {', '.join(_DTYPES)}")
    shape = tuple(a.shape)
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise WireError(f"{name} has shape {shape}")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(a.data) != expected:
        raise WireError(f"{name} holds {len(a.data)} bytes, its {a.dtype} {shape} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(a.data), dtype=dtype).reshape(shape)


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name, t in tensors.items():
        record[name] = tensor_array(t)
    return record


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    return {name: array_tensor(name, a) for name, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record, counted from its arrays as they travel."""
    return sum(len(a.data) for a in record.values())


def encode_plan(plan: ClientPlan, client_id: int, rnd: int, seed: int) -> RecordDict:
    """A train message's content: `plan.downlink()` and what the node needs to rebuild the rest."""
    return RecordDict(
        {
            PLAN_ARRAYS: to_record(plan.downlink()),
            PLAN_CONFIG: ConfigRecord(
                {
                    "client-id": client_id,
                    "round": rnd,
                    "seed": seed,
                    "rank": plan.adapter.rank,
                    "train-a": plan.train_a,
                    "fresh": plan.fresh,
                    "merge": [delta.version for delta in plan.merge],
                    "fold": plan.fold is not None,
                }
            ),
        }
    )


def decode_plan(content: RecordDict, round0: AdapterWeights) -> tuple[ClientPlan, dict[str, int]]:
    """The plan a train message carries, and its header (client id, round, seed). `round0` is the run's
    round-0 global adapter at the bank rank, which the node rebuilt from the seed: the factors the plan
    says do not travel (FLoRA's fresh ones, FFA-LoRA's frozen `A`) come from it, cut to the plan's rank.
    Raises WireError for a message that is not a plan the server could have made."""
    try:
        header = content.config_records[PLAN_CONFIG]
        received = from_record(content.array_records[PLAN_ARRAYS])
        rank, train_a, fresh = int(header["rank"]), bool(header["train-a"]), bool(header["fresh"])
        versions = [int(v) for v in header["merge"]]
        has_fold = bool(header["fold"]) if "fold" in header else False
        meta = {key: int(header[key]) for key in ("client-id", "round", "seed")}
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"not a plan: {e}") from None
    if not 1 <= rank <= round0.rank:
        raise WireError(f"plan rank {rank} is outside 1..{round0.rank}")
    base = round0.truncate(rank).tensors()
    adapter = {}
    for name, t in base.items():
        is_a, is_b = name.endswith(".lora_A"), name.endswith(".lora_B")
        rebuilt = (fresh and (is_a or is_b)) or (is_a and not train_a)
        adapter[name] = t if rebuilt else received.get(name)
        if adapter[name] is None:
            raise WireError(f"the plan lacks {name}")
    merge = []
    for version in versions:
        prefix = f"{_MERGE}{version}."
        delta = {k.removeprefix(prefix): t for k, t in received.items() if k.startswith(prefix)}
        try:
            merge.append(BaseDelta(version, AdapterWeights.from_tensors(delta)))
        except ValueError as e:
            raise WireError(f"base delta {version}: {e}") from None
    fold = None
    if has_fold:
        folded = {k.removeprefix(_FOLD): t for k, t in received.items() if k.startswith(_FOLD)}
        try:
            fold = AdapterWeights.from_tensors(folded)
        except ValueError as e:
            raise WireError(f"the plan's fold: {e}") from None
        if fold.dense or not fold.factors:
            raise WireError("the plan's fold holds no LoRA factors, or tensors that are not factors")
    try:
        plan = ClientPlan(AdapterWeights.from_tensors(adapter), train_a, fresh, tuple(merge), fold)
    except ValueError as e:
        raise WireError(f"the plan's adapter: {e}") from None
    if plan.downlink().keys() != received.keys():  # every array accounted for, none extra
        extra = sorted(received.keys() - plan.downlink().keys())
        raise WireError(f"the plan carries tensors it does not use: {extra[:3]}")
    return plan, meta


def encode_update(plan: ClientPlan, result: TrainResult) -> RecordDict:
    """A train reply's content: what the plan says travels up, and the training's figures."""
    return RecordDict(
        {
            UPDATE_ARRAYS: to_record(plan.uplink(result.weights)),
            UPDATE_METRICS: MetricRecord({key: getattr(result, field) for key, field in _FIGURES.items()}),
        }
    )


def decode_update(content: RecordDict, client_id: int, plan: ClientPlan) -> tuple[ClientUpdate, TrainResult]:
    """The update a train reply carries, completed from the plan it answers: the tensors that do not
    travel up (a frozen `A`) are the plan's own. Raises WireError for a reply that cannot be read as an
    adapter; one that can is still validated against the plan by `FederatedServer.aggregate`."""
    try:
        received = from_record(content.array_records[UPDATE_ARRAYS])
        m = content.metric_records[UPDATE_METRICS]
        # As sent (a float count, a NaN, 2^62 bytes): the update's validation judges num_samples, and
        # hlora.federation.reports every figure before it enters the metrics. Only a figure that is not
        # one number makes the reply unreadable.
        figures = {key: m[key] for key in _FIGURES}
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"not an update: {e}") from None
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"not an update: {key} is a {type(value).__name__}, not a number")
    num_samples = figures["num-samples"]
    kept = {name: t for name, t in plan.adapter.tensors().items() if name not in plan.uplink(plan.adapter)}
    try:
        weights = AdapterWeights.from_tensors({**kept, **received})
    except ValueError as e:
        raise WireError(f"not an adapter: {e}") from None
    result = TrainResult(weights, **{_FIGURES[key]: value for key, value in figures.items()})
    return ClientUpdate(client_id, num_samples, weights), result
