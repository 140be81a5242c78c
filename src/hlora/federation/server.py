"""The server's side of a round, independent of how messages travel.

`configure(round)` picks the round's clients and what each is sent; `aggregate(round, updates)` checks
their replies against what they were sent and folds the valid ones into the next global adapter. The
in-process simulation calls the clients directly in between; a Flower strategy does the same through
Flower's messages.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from hlora.aggregation.base import Aggregator, client_weights
from hlora.aggregation.instruments import block_edges, round_instruments
from hlora.errors import AggregationError
from hlora.federation.validation import Rejection, lower_median, update_norm, validate_update
from hlora.privacy.mechanism import DpMechanism
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.seeding import sampling_seed
from hlora.weights import AdapterWeights, tensor_bytes

log = logging.getLogger("hlora.federation")


@dataclass(frozen=True)
class RoundTraffic:
    """Bytes of tensor data one round moved: per client, and summed over the round's clients."""

    uplink_bytes_by_client: dict[int, int]
    downlink_bytes_by_client: dict[int, int]

    @property
    def uplink_bytes(self) -> int:
        return sum(self.uplink_bytes_by_client.values())

    @property
    def downlink_bytes(self) -> int:
        return sum(self.downlink_bytes_by_client.values())


@dataclass(frozen=True)
class RoundOutcome:
    """What `FederatedServer.aggregate` made of one round's replies."""

    accepted: tuple[int, ...]  # client ids whose updates were valid (and aggregated, unless `failed`)
    rejected: dict[int, Rejection] = field(default_factory=dict)  # client id -> why its update was refused
    missing: tuple[int, ...] = ()  # planned clients that sent nothing (crashed, timed out, lost)
    failed: bool = False  # True: nothing was aggregated, the global state is as it was
    reason: str = ""  # why the round failed
    # client id -> L2 norm of the change its accepted update made (validation.update_norm): what honest
    # clients send, so that a `max_update_norm` can be chosen from a run without one
    update_norms: dict[int, float] = field(default_factory=dict)
    # client id -> the `num_samples` an accepted update claimed where it differs from the size the server
    # knows for that client (which is what it was weighted by)
    misreported: dict[int, float] = field(default_factory=dict)
    # What the method made of the accepted updates, in product space (`aggregation.instruments`); None
    # for a failed round, or where the figures could not be computed. `instruments_s`: their cost, in
    # wall and in this process's CPU seconds (`instruments_cpu_s`).
    instruments: dict[str, Any] | None = None
    instruments_s: float = 0.0
    instruments_cpu_s: float = 0.0
    # With [privacy]: what the DP mechanism did (`PrivateRound.record()`: sigma, clipped, aggregated);
    # None without privacy or for a failed round
    privacy: dict[str, Any] | None = None


def sample_clients(clients: Iterable[int], per_round: int, seed: int, rnd: int) -> list[int]:
    """Round `rnd`'s clients out of `clients`: a draw of `per_round` without replacement from the run's
    `sampling_seed(seed, rnd)`, in ascending id order (all of them where `per_round` covers them); a
    function of its arguments alone, so that a round's sample can be read without a server."""
    ids = sorted(clients)
    if per_round >= len(ids):
        return ids
    rng = np.random.default_rng(sampling_seed(seed, rnd))
    return sorted(int(i) for i in rng.choice(ids, size=per_round, replace=False))


class FederatedServer:
    """Holds the global adapter and runs the aggregation method each round.

    Every update is validated against the plan its client was sent (`hlora.federation.validation`),
    and, with `update_norm_factor`, against the round's other updates (a change norm above that factor
    times the round's lower median is an `outlier`); the valid ones are aggregated when there are at
    least `min_clients` of them, else the round fails and the global state stays as it was.

    `client_sizes` (client id -> training rows, for every client of `client_ranks`) are the sizes of
    the server's own partition: updates are weighted by those, never by the `num_samples` a client
    claims (a claim that differs is logged and recorded). None (tests and tools without a partition):
    by the claims.

    With `privacy` (a `DpMechanism`, [privacy]), the accepted updates are not weighed by size at all:
    the mechanism clips each change and averages them with fixed weights, adds noise, and the method
    re-factors the noisy mean (`hlora.privacy.mechanism`). The relative outlier rule is then off: it
    would let one client's update decide whether another's is included.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        initial: AdapterWeights,
        client_ranks: Mapping[int, int],
        clients_per_round: int,
        seed: int,
        min_clients: int = 1,
        max_update_norm: float | None = None,
        client_sizes: Mapping[int, int] | None = None,
        update_norm_factor: float | None = None,
        privacy: DpMechanism | None = None,
    ) -> None:
        aggregator.check_ranks(client_ranks)
        if privacy is not None and aggregator.private_space is None:
            raise ValueError(f"{aggregator.name} has no private path for the DP mechanism")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if client_sizes is not None:
            if client_sizes.keys() != client_ranks.keys():
                raise ValueError(
                    f"client_sizes has clients {sorted(client_sizes)}, client_ranks {sorted(client_ranks)}"
                )
            if not all(isinstance(n, int) and n > 0 for n in client_sizes.values()):
                raise ValueError(f"client_sizes must be integers > 0, got {dict(client_sizes)}")
        if update_norm_factor is not None and not update_norm_factor >= 1:
            raise ValueError(f"update_norm_factor must be >= 1, got {update_norm_factor}")
        self.client_sizes = dict(client_sizes) if client_sizes is not None else None
        # inf: no relative bound
        self.update_norm_factor = update_norm_factor if update_norm_factor != math.inf else None
        self.privacy = privacy
        if privacy is not None:
            self.update_norm_factor = None  # data-dependent inclusion: see the class docstring
        self.aggregator = aggregator
        self.client_ranks = dict(client_ranks)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.global_weights = aggregator.initial_global(initial)
        self.version = 0  # aggregations made so far
        # client id -> `version` of the last plan it is known to hold: the plan of its last valid update.
        # A client that crashed, timed out or sent a bad update may not hold what it was sent, so it is
        # sent from its last known version again (merging a base delta twice is a no-op).
        self._synced: dict[int, int] = {}
        self._round: int | None = None  # the round configured last, and what its clients were sent
        self._plans: dict[int, tuple[ClientPlan, int]] = {}  # client id -> (plan, `version` it was made at)

    def sample(self, rnd: int) -> list[int]:
        """The round's clients (`sample_clients`)."""
        return sample_clients(self.client_ranks, self.clients_per_round, self.seed, rnd)

    def configure(self, rnd: int) -> dict[int, ClientPlan]:
        """What each of the round's clients is asked to do, at its rank."""
        plans = {}
        for cid in self.sample(rnd):
            plans[cid] = self.aggregator.plan_client(
                self.global_weights, self.client_ranks[cid], self._synced.get(cid, 0), client_id=cid, rnd=rnd
            )
        self._round = rnd
        self._plans = {cid: (plan, self.version) for cid, plan in plans.items()}
        return plans

    def model_plan(self, rank: int | None = None) -> ClientPlan:
        """The model a client of `rank` holds at the start of the next round, as a plan from scratch
        (default: the global model at the bank rank). It is what the server evaluates."""
        return self.aggregator.plan_for(
            self.global_weights, rank if rank is not None else self.aggregator.bank_rank, synced=0
        )

    def state_dict(self) -> dict[str, Any]:
        """What the rounds so far have changed, for a checkpoint: the global adapter (`global_weights`,
        name -> tensor), `version`, the version each client last received (`synced`, keyed by the client
        id as a string) and the aggregator's own state (`aggregator`). The rest comes from the config."""
        return {
            "global_weights": self.global_weights.tensors(),
            "version": self.version,
            "synced": {str(cid): version for cid, version in sorted(self._synced.items())},
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output into a server built from the same config (so the same method,
        clients and round-0 adapter). Raises ValueError for a state that does not fit it."""
        current = self.global_weights.tensors()
        saved = state["global_weights"]
        if saved.keys() != current.keys():
            raise ValueError(
                f"the global adapter's tensors differ: {sorted(saved.keys() ^ current.keys())[:3]}"
            )
        for name, t in current.items():
            if saved[name].shape != t.shape or saved[name].dtype != t.dtype:
                raise ValueError(
                    f"global adapter tensor {name} is {saved[name].dtype} {tuple(saved[name].shape)}, "
                    f"this run's is {t.dtype} {tuple(t.shape)}"
                )
        synced = {int(cid): int(version) for cid, version in state["synced"].items()}
        if not synced.keys() <= self.client_ranks.keys():
            raise ValueError(f"unknown clients {sorted(synced.keys() - self.client_ranks.keys())}")
        self.aggregator.load_state_dict(state["aggregator"])
        # In this run's order of names: what iterates over the adapter sees it as before.
        self.global_weights = AdapterWeights.from_tensors({name: saved[name] for name in current})
        self.version = int(state["version"])
        self._synced = synced

    def forget_clients(self, client_ids: Iterable[int] | None = None) -> None:
        """Assume these clients (default: all) hold nothing from earlier rounds: each is next sent its
        plan from scratch (FLoRA: every base delta). For a runtime whose clients can start afresh though
        the server does not (a resumed Flower run, a SuperNode that restarted)."""
        for cid in list(self._synced) if client_ids is None else client_ids:
            self._synced.pop(cid, None)

    def aggregate(self, rnd: int, updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Validate this round's updates against their plans and, if at least `min_clients` are valid,
        replace the global adapter by the method's aggregate of those, weighted by `client_sizes`. A
        refused update is logged (one warning each) and left out; with too few valid ones, or an
        aggregate the method cannot make or that is not finite, nothing changes (`version` included) and
        the outcome says the round failed. No update, however made, makes it raise."""
        if rnd != self._round:
            raise ValueError(f"aggregate(round {rnd}) without configure({rnd}) before it")
        accepted, rejected, norms = self._screen(updates)
        missing = tuple(sorted(self._plans.keys() - {u.client_id for u in updates}))
        for cid, why in sorted(rejected.items()):
            log.warning("round %d: client %s rejected (%s): %s", rnd, cid, why.code, why.detail)
        for u in accepted:  # a valid update shows its client holds what it was sent, failed round or not
            self._synced[u.client_id] = self._plans[u.client_id][1]
        accepted, misreported = self._weigh(rnd, accepted)
        ids = tuple(u.client_id for u in accepted)
        private = None
        if len(accepted) < self.min_clients:
            reason = f"{len(accepted)} valid update(s), min_clients is {self.min_clients}"
        else:
            reason, private = self._fold(rnd, accepted)
        instruments, t0, cpu0 = None, time.perf_counter(), time.process_time()
        if reason:
            log.warning("round %d failed (%s): the global model is unchanged", rnd, reason)
        else:
            instruments = self._instruments(rnd, accepted)
        return RoundOutcome(
            ids,
            rejected,
            missing,
            bool(reason),
            reason,
            update_norms=norms,
            misreported=misreported,
            instruments=instruments,
            instruments_s=time.perf_counter() - t0,
            instruments_cpu_s=time.process_time() - cpu0,
            privacy=None if reason else private,
        )

    def adopt(
        self,
        rnd: int,
        candidate: AdapterWeights | None,
        contributors: Sequence[int],
        reason: str = "",
        privacy: dict[str, Any] | None = None,
    ) -> RoundOutcome:
        """Take a global adapter aggregated from sums alone (a secure round, `federation.secure`): no
        update reached the server, so none is validated, weighed or measured here. `contributors` are the
        planned clients whose contributions are in `candidate`; with fewer than `min_clients` of them, a
        `reason` (the round could not be summed), or a `candidate` that is not finite, nothing changes
        and the outcome says the round failed. `privacy`: what distributed DP did (the outcome's
        `privacy`, for a round that did not fail)."""
        if rnd != self._round:
            raise ValueError(f"adopt(round {rnd}) without configure({rnd}) before it")
        ids = tuple(sorted(contributors))
        if not set(ids) <= self._plans.keys():
            raise ValueError(f"clients {sorted(set(ids) - self._plans.keys())} were not planned this round")
        for cid in ids:  # a contribution was computed from what the client was sent
            self._synced[cid] = self._plans[cid][1]
        if not reason and len(ids) < self.min_clients:
            reason = f"{len(ids)} client(s) in the secure sums, min_clients is {self.min_clients}"
        if not reason and (candidate is None or not _finite(candidate)):
            reason = "the aggregate is not finite"
        if reason:
            log.warning("round %d failed (%s): the global model is unchanged", rnd, reason)
        else:
            self.global_weights = candidate  # type: ignore[assignment]
            self.version += 1
        missing = tuple(sorted(self._plans.keys() - set(ids)))
        return RoundOutcome(ids, {}, missing, bool(reason), reason, privacy=None if reason else privacy)

    def _instruments(self, rnd: int, accepted: list[ClientUpdate]) -> dict[str, Any] | None:
        """The round's instruments (`aggregation.instruments.round_instruments`) over the accepted updates,
        with the federation's ranks as the block edges; None, logged, where they cannot be computed (they
        are a record of the round, never a reason to fail it). Figures that are not finite are None."""
        try:
            figures = round_instruments(
                self.aggregator.global_update(self.global_weights),
                [u.weights.factors for u in accepted],
                client_weights(accepted),
                block_edges(self.client_ranks.values()),
                self.aggregator.bank_rank,
            )
        except (ValueError, ArithmeticError, RuntimeError, KeyError) as e:
            log.warning("round %d: the aggregation's instruments could not be computed: %s", rnd, e)
            return None
        return _finite_figures(figures)

    def _fold(self, rnd: int, accepted: list[ClientUpdate]) -> tuple[str, dict[str, Any] | None]:
        """Replace the global adapter by the method's aggregate of `accepted` (with `privacy`, the DP
        mechanism's); or, where the method refuses them or its result is not finite, change nothing and
        say why. Also returns the mechanism's record of the round (None without privacy)."""
        kept = self.aggregator.state_dict()  # what the method gathered so far (FLoRA: its stacks)
        private = None
        try:
            if self.privacy is None:
                candidate = self.aggregator.aggregate(self.global_weights, accepted)
            else:
                plans = {cid: plan for cid, (plan, _) in self._plans.items()}
                candidate, record = self.privacy.aggregate(
                    self.aggregator, self.global_weights, rnd, plans, accepted
                )
                private = record.record()
        except AggregationError as e:
            reason = str(e)
        # Validated updates can still be beyond the method: factors so large that LAPACK fails on them,
        # or weights that are not usable. A client's reply must never stop the server.
        except (ValueError, ArithmeticError, RuntimeError) as e:
            reason = f"{self.aggregator.name} could not aggregate: {e}"
        else:
            # Finite updates can still overflow when no norm bound holds them.
            reason = "" if _finite(candidate) else "the aggregate is not finite"
        if reason:
            # A round that fails leaves the method's own state as it was too, or its clients would merge
            # a stack of a round that never happened.
            self.aggregator.load_state_dict(kept)
        else:
            self.global_weights = candidate
            self.version += 1
        return reason, private

    def _weigh(self, rnd: int, accepted: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict[int, float]]:
        """The updates with `num_samples` set to the size the server knows for each client, and the
        claims that differ from it (each logged): a client cannot choose its own weight."""
        if self.client_sizes is None:
            return accepted, {}
        weighed, misreported = [], {}
        for u in accepted:
            size = self.client_sizes[u.client_id]
            if u.num_samples != size:
                misreported[u.client_id] = u.num_samples
                log.warning(
                    "round %d: client %s claims %s training samples, the server's partition gave it %d: "
                    "weighted by %d",
                    rnd, u.client_id, u.num_samples, size, size,
                )  # fmt: skip
                u = replace(u, num_samples=size)
            weighed.append(u)
        return weighed, misreported

    def _change(self, update: ClientUpdate) -> float:
        plan = self._plans[update.client_id][0]
        return update_norm(plan.uplink(update.weights), plan.uplink(plan.adapter))

    def screen(self, updates: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], dict[int, Rejection]]:
        """The valid updates of the round configured last (by client id: results never depend on arrival
        order), and why each other one was refused. A client this round did not plan for, or that sent
        more than one update, is refused too; with `update_norm_factor`, so is an outlier."""
        accepted, rejected, _ = self._screen(updates)
        return accepted, rejected

    def _screen(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[int, Rejection], dict[int, float]]:
        """`screen`, and the change norm of every accepted update."""
        counts: dict[int, int] = {}
        for u in updates:
            counts[u.client_id] = counts.get(u.client_id, 0) + 1
        valid, rejected = [], {}
        for u in sorted(updates, key=lambda u: u.client_id):
            cid = u.client_id
            if cid not in self._plans:
                rejected[cid] = Rejection("unplanned", f"client {cid} was not asked for an update this round")
            elif counts[cid] > 1:
                rejected[cid] = Rejection("duplicate", f"client {cid} sent {counts[cid]} updates")
            else:
                why = validate_update(u, self._plans[cid][0], self.max_update_norm)
                if why is None:
                    valid.append(u)
                else:
                    rejected[cid] = why
        norms = {u.client_id: self._change(u) for u in valid}
        factor = self.update_norm_factor
        if factor is not None and len(valid) > 1:
            # Relative to the lower median: more than half of the valid updates must be boosted to move
            # it up (the honest-majority assumption); of two, the smaller one is the reference.
            reference = lower_median(norms.values())
            for cid, norm in norms.items():
                if not norm <= factor * reference:
                    rejected[cid] = Rejection(
                        "outlier",
                        f"the change from what was sent has L2 norm {norm:.4g} > update_norm_factor "
                        f"{factor:g} x {reference:.4g}, the lower median of the round's {len(valid)} valid "
                        "updates",
                    )
            valid = [u for u in valid if u.client_id not in rejected]
            norms = {cid: norm for cid, norm in norms.items() if cid not in rejected}
        return valid, rejected, norms


def _finite_figures(value: Any) -> Any:
    """`value` with every float that is not finite (overflow of huge but finite updates) made None, so
    that `metrics.jsonl` stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_figures(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_figures(v) for v in value]
    return value


def _finite(weights: AdapterWeights) -> bool:
    """Every value finite: the last guard against an aggregate that overflowed (an update may be finite
    and still huge when no `max_update_norm` bounds it)."""
    return all(bool(torch.isfinite(t).all()) for t in weights.tensors().values())


def traffic(plans: Mapping[int, ClientPlan], updates: Sequence[ClientUpdate]) -> RoundTraffic:
    """Bytes of tensor data sent down (plans) and up (updates) in one round, per client: only the
    tensors each plan says travel (FFA-LoRA's frozen `A` does not; FLoRA's stacks do). An update from a
    client without a plan (refused as unplanned) is counted as every tensor it sent."""
    return RoundTraffic(
        uplink_bytes_by_client={
            u.client_id: tensor_bytes(
                plans[u.client_id].uplink(u.weights).values()
                if u.client_id in plans
                else u.weights.tensors().values()
            )
            for u in updates
        },
        downlink_bytes_by_client={cid: tensor_bytes(p.downlink().values()) for cid, p in plans.items()},
    )
