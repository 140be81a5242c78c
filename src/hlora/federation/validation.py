"""Checks one client's update against the plan it was sent, before the update may reach aggregation.

`validate_update` is pure and runtime-agnostic: the simulation's server calls it on every update, and a
Flower strategy can call it on every reply. What a valid update looks like comes from the plan alone:
the tensors the plan says travel up (`ClientPlan.uplink`), each with the name, shape and dtype of the
tensor the client started from. So a method's own choices (FFA-LoRA's frozen `A` that does not travel,
FLoRA's fresh adapter) are respected without asking which method runs.

The norm bound is on the change the client made, `sqrt(sum_t ||received_t - sent_t||_F^2)` over the
tensors it sends up, not on the tensors themselves: the global adapter grows as training goes on, so
a fixed bound on the absolute norm would in time reject honest clients, while the change one round of
local training makes stays of one size. It is the quantity DP-FedAvg clips, and it bounds what
aggregation consumes (factor means directly, and `B @ A` through the factors).

That absolute bound (`federation.max_update_norm`) must be chosen per setup, so it is off by default.
What is on by default is a bound relative to the round (`FederatedServer`, `federation.update_norm_factor`):
an update whose change norm exceeds the factor times the round's `lower_median` change norm is refused
as an `outlier`. It assumes an honest majority: more than half of a round's valid updates are honest
(of two, the smaller is the reference, so one boosted client of two is caught).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from hlora.protocol import ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights

# Every reason an update can be refused for, as the code that metrics count.
REASONS = (
    "weight",  # num_samples is not a finite number > 0 (the aggregation weight comes from it)
    "malformed",  # not an adapter, or a value that is not a dense tensor
    "missing",  # a tensor the plan expects back is absent
    "extra",  # a tensor the plan does not expect back
    "rank",  # a LoRA factor above the rank the client was given
    "shape",  # any other shape than the one the client was sent
    "dtype",  # another dtype than the one the client was sent
    "nonfinite",  # NaN or Inf values
    "norm",  # the change from what was sent exceeds federation.max_update_norm
    # and three that only the server can see, across a round's updates (FederatedServer.screen):
    "outlier",  # the change exceeds federation.update_norm_factor x the round's lower median change
    "unplanned",  # from a client that was not asked for an update this round
    "duplicate",  # one of several updates from the same client
)


@dataclass(frozen=True)
class Rejection:
    """Why an update was refused: `code` is one of `REASONS` (stable, for metrics), `detail` is for the
    log and names the tensor."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def validate_update(
    update: ClientUpdate, plan: ClientPlan, max_update_norm: float | None = None
) -> Rejection | None:
    """None if `update` is what `plan` asked for, else the first reason to refuse it.

    Checks, in this order: the reported sample count; the tensor names against `plan.uplink`; each
    tensor's shape (a LoRA factor wider than the plan's rank is `rank`) and dtype; finiteness; and, with
    `max_update_norm`, the L2 norm of the change from the tensors the plan sent. Never raises.
    """
    weight = _check_weight(update.num_samples)
    if weight is not None:
        return weight
    if not isinstance(update.weights, AdapterWeights):
        return Rejection("malformed", f"weights are a {type(update.weights).__name__}, not an adapter")
    try:
        received = plan.uplink(update.weights)
    except (AttributeError, TypeError, ValueError) as e:
        return Rejection("malformed", f"the adapter cannot be read: {e}")
    expected = plan.uplink(plan.adapter)

    missing = sorted(expected.keys() - received.keys())
    if missing:
        return Rejection("missing", _names("tensor", missing) + " not sent")
    extra = sorted(received.keys() - expected.keys(), key=str)
    if extra:
        return Rejection("extra", _names("unexpected tensor", extra))
    for name, want in expected.items():
        problem = _check_structure(name, received[name], want)
        if problem is not None:
            return problem
    for name, got in received.items():
        bad = int((~torch.isfinite(got)).sum())
        if bad:
            nan = int(torch.isnan(got).sum())
            return Rejection("nonfinite", f"{name} has {nan} NaN and {bad - nan} infinite values")
    if max_update_norm is not None:
        norm = update_norm(received, expected)
        if not norm <= max_update_norm:
            return Rejection(
                "norm",
                f"the change from what was sent has L2 norm {norm:.4g} > max_update_norm {max_update_norm:g} "
                f"(largest in {_largest_change(received, expected)})",
            )
    return None


def update_norm(received: dict[str, Tensor], sent: dict[str, Tensor]) -> float:
    """`sqrt(sum_t ||received_t - sent_t||_F^2)` over the tensors of `sent`, in float64."""
    return math.sqrt(sum(_change(received[k], sent[k]) ** 2 for k in sent))


def lower_median(values: Iterable[float]) -> float:
    """The lower median: the middle value of an odd count, the smaller of the two middle ones of an even
    count (of two values, the smaller). Unlike the mean, half the values (less one) can be as large as
    they like without moving it up. Raises ValueError for no values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the lower median of no values")
    return ordered[(len(ordered) - 1) // 2]


def _change(got: Tensor, sent: Tensor) -> float:
    return float(torch.linalg.vector_norm(got.to(sent.device, torch.float64) - sent.double()))


def _largest_change(received: dict[str, Tensor], sent: dict[str, Tensor]) -> str:
    return max(sent, key=lambda k: _change(received[k], sent[k]))


def _check_weight(num_samples: object) -> Rejection | None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Real):
        return Rejection("weight", f"num_samples is a {type(num_samples).__name__}, not a number")
    try:
        ok = math.isfinite(float(num_samples)) and num_samples > 0
    except OverflowError:  # an int too large for a float: p_k would be 0 or 1 for every other client
        ok = False
    shown = repr(num_samples) if len(repr(num_samples)) <= 24 else f"{repr(num_samples)[:20]}..."
    return None if ok else Rejection("weight", f"num_samples is {shown}, not a finite number > 0")


def _check_structure(name: str, got: object, want: Tensor) -> Rejection | None:
    if not isinstance(got, Tensor) or got.layout != torch.strided:
        what = type(got).__name__ if not isinstance(got, Tensor) else f"{got.layout} tensor"
        return Rejection("malformed", f"{name} is a {what}, not a dense tensor")
    if got.shape != want.shape:
        code = "rank" if _wider_rank(name, tuple(got.shape), tuple(want.shape)) else "shape"
        given = f" (rank {want.shape[_rank_dim(name)]} given)" if code == "rank" else ""
        return Rejection(code, f"{name} is {tuple(got.shape)}, expected {tuple(want.shape)}{given}")
    if got.dtype != want.dtype:
        return Rejection("dtype", f"{name} is {got.dtype}, expected {want.dtype}")
    return None


def _rank_dim(name: str) -> int:
    """The rank's axis of a LoRA factor: rows of `A` (r x n), columns of `B` (m x r); -1 for others."""
    return 0 if name.endswith(".lora_A") else 1 if name.endswith(".lora_B") else -1


def _wider_rank(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A factor that matches the plan except for more components than the client's rank."""
    dim = _rank_dim(name)
    if dim < 0 or len(got) != 2 or len(want) != 2:
        return False
    other = 1 - dim
    return got[other] == want[other] and got[dim] > want[dim]


def _names(what: str, names: list[object]) -> str:
    shown = ", ".join(str(n) for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{what}{'s' if len(names) > 1 else ''} {shown}{more}"
