"""Faults injected into the in-process simulation (`[faults]`): clients that crash, time out, or send a
corrupted update.

Each sampled client draws at most one fault per round, from (run seed, round, client) through
`derive_seed` and never from global random state, so a run with faults is as reproducible, and as
resumable, as one without; raising a probability only adds faulty clients to those drawn before.

- crash: the client raises `ClientCrash` before it replies; the runtime catches it and nothing reaches
  the server.
- timeout: the client trains and replies too late: the runtime discards the reply (`ClientTimeout`).
- corrupt: the client's update is mangled on its way (`corrupt_update`). The server is not told; it
  must refuse the update through validation alone. A boosted update (`scale`, its change times
  `BOOST`) is finite and well formed: it is refused as an `outlier` by the default
  `federation.update_norm_factor` (against the round's other valid updates, so not where it is the
  round's only one, or where boosted ones are the majority), or as `norm` with `max_update_norm` set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hlora.client.client import FederatedClient
from hlora.config import CORRUPT_KINDS, FaultSettings
from hlora.protocol import ClientPlan, ClientUpdate, TrainResult
from hlora.seeding import fault_seed
from hlora.weights import AdapterWeights

BOOST = 1e6  # "scale": the factor a boosted update multiplies its change by
EXTRA_TENSOR = "unexpected.weight"  # "extra": the name of the tensor added to the update


class ClientFailure(Exception):
    """A client whose reply never reached the server; `kind` says why ("crash" or "timeout")."""

    kind = "failure"


class ClientCrash(ClientFailure):
    kind = "crash"


class ClientTimeout(ClientFailure):
    kind = "timeout"


@dataclass(frozen=True)
class Fault:
    """The fault one client suffers in one round."""

    kind: str  # "crash", "timeout" or "corrupt"
    corrupt_kind: str | None = None  # for "corrupt": one of CORRUPT_KINDS


class FaultInjector:
    """Draws each client's fault for a round and plays it while the client runs."""

    def __init__(self, settings: FaultSettings, seed: int) -> None:
        self.settings = settings
        self.seed = seed

    @property
    def active(self) -> bool:
        s = self.settings
        return s.crash + s.timeout + s.corrupt > 0

    def __str__(self) -> str:
        s = self.settings
        return f"crash {s.crash:g}, timeout {s.timeout:g}, corrupt {s.corrupt:g} ({s.corrupt_kind})"

    def draw(self, rnd: int, client_id: int) -> Fault | None:
        """The fault `client_id` suffers in round `rnd`, or None."""
        return self._draw(rnd, client_id)[0]

    def corrupted(self, rnd: int, client_ids: Iterable[int]) -> dict[int, str]:
        """`{client id: corrupt kind}` of the given clients whose update is corrupted in round `rnd`."""
        faults = {cid: self.draw(rnd, cid) for cid in client_ids}
        return {cid: f.corrupt_kind for cid, f in faults.items() if f is not None and f.kind == "corrupt"}

    def fit(
        self, client: FederatedClient, plan: ClientPlan, rnd: int, seed: int
    ) -> tuple[ClientUpdate, TrainResult]:
        """`client.fit(plan, seed)` with the client's fault for round `rnd` played. Raises
        ClientFailure for a client whose reply never arrives."""
        fault, rng = self._draw(rnd, client.client_id)
        if fault is not None and fault.kind == "crash":
            raise ClientCrash(f"client {client.client_id} crashed (injected)")
        update, result = client.fit(plan, seed)
        if fault is not None and fault.kind == "timeout":
            raise ClientTimeout(f"client {client.client_id} timed out (injected): its reply is discarded")
        if fault is not None and fault.kind == "corrupt":
            update = corrupt_update(update, plan, fault.corrupt_kind, rng)  # type: ignore[arg-type]
        return update, result

    def _draw(self, rnd: int, client_id: int) -> tuple[Fault | None, np.random.Generator]:
        s = self.settings
        rng = np.random.default_rng(fault_seed(self.seed, rnd, client_id))
        u = rng.random()
        if u < s.crash:
            return Fault("crash"), rng
        if u < s.crash + s.timeout:
            return Fault("timeout"), rng
        if u < s.crash + s.timeout + s.corrupt:
            kind = s.corrupt_kind if s.corrupt_kind != "any" else str(rng.choice(CORRUPT_KINDS))
            return Fault("corrupt", kind), rng
        return None, rng


def corrupt_update(
    update: ClientUpdate, plan: ClientPlan, kind: str, rng: np.random.Generator
) -> ClientUpdate:
    """`update` mangled in the way `kind` names (one of CORRUPT_KINDS), in one of the tensors `plan`
    says travel up (picked by `rng`); the original is left as it was."""
    flat = dict(update.weights.tensors())
    sent = plan.uplink(plan.adapter)
    names = sorted(sent)
    target = names[int(rng.integers(len(names)))]
    layers = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith((".lora_A", ".lora_B"))})
    num_samples = update.num_samples
    t = flat[target]
    if kind in ("nan", "inf"):
        values = t.detach().clone().reshape(-1)
        bad = math.nan if kind == "nan" else float(rng.choice([-1, 1])) * math.inf
        values[int(rng.integers(values.numel()))] = bad
        flat[target] = values.reshape(t.shape)
    elif kind == "rank" and layers:  # one more component in both factors of a layer: they still fit
        layer = layers[int(rng.integers(len(layers)))]
        B, A = flat[f"{layer}.lora_B"], flat[f"{layer}.lora_A"]
        flat[f"{layer}.lora_B"] = torch.cat([B, B[:, :1]], dim=1)
        flat[f"{layer}.lora_A"] = torch.cat([A, A[:1]], dim=0)
    elif kind in ("shape", "rank"):  # an axis other than the rank's: an `A` gains a column, others a row
        dim = 1 if target.endswith(".lora_A") else 0
        flat[target] = torch.cat([t, t.narrow(dim, 0, 1)], dim=dim)
    elif kind == "missing":  # a factor goes with its partner, as an adapter holds them in pairs
        stem = target.rsplit(".", 1)[0] if target.endswith((".lora_A", ".lora_B")) else None
        for name in [f"{stem}.lora_A", f"{stem}.lora_B"] if stem else [target]:
            del flat[name]
    elif kind == "extra":
        flat[EXTRA_TENSOR] = torch.zeros_like(t)
    elif kind == "dtype":
        flat[target] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    elif kind == "weight":  # a client that claims no training samples
        num_samples = 0
    elif kind == "scale":  # a boosted update: every change it makes, multiplied
        for name in names:
            flat[name] = sent[name] + BOOST * (flat[name] - sent[name])
    else:
        raise ValueError(f"unknown corrupt kind {kind!r}; allowed: {', '.join(CORRUPT_KINDS)}")
    return ClientUpdate(update.client_id, num_samples, AdapterWeights.from_tensors(flat))
