"""The server's side of a round, independent of how messages travel.

`configure(round)` picks the round's clients and what each is sent; `aggregate(round, updates)` folds
their replies into the next global adapter. The in-process simulation calls the clients directly in
between; a Flower strategy does the same through Flower's messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hlora.aggregation.base import Aggregator, ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, tensor_bytes


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (run seed, round, client, ...), not on call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


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


class FederatedServer:
    """Holds the global adapter and runs the aggregation method each round."""

    def __init__(
        self,
        aggregator: Aggregator,
        initial: AdapterWeights,
        client_ranks: Mapping[int, int],
        clients_per_round: int,
        seed: int,
    ) -> None:
        aggregator.check_ranks(client_ranks)
        self.aggregator = aggregator
        self.client_ranks = dict(client_ranks)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.global_weights = aggregator.initial_global(initial)
        self.version = 0  # aggregations made so far
        self._synced: dict[int, int] = {}  # client id -> `version` when it last received a plan

    def sample(self, rnd: int) -> list[int]:
        """The round's clients: a seeded draw without replacement, in ascending id order."""
        ids = sorted(self.client_ranks)
        if self.clients_per_round >= len(ids):
            return ids
        rng = np.random.default_rng(derive_seed(self.seed, rnd, 0x5A3D1E))
        return sorted(int(i) for i in rng.choice(ids, size=self.clients_per_round, replace=False))

    def configure(self, rnd: int) -> dict[int, ClientPlan]:
        """What each of the round's clients is asked to do, at its rank."""
        plans = {}
        for cid in self.sample(rnd):
            plans[cid] = self.aggregator.plan_for(
                self.global_weights, self.client_ranks[cid], synced=self._synced.get(cid, 0)
            )
            self._synced[cid] = self.version
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

    def aggregate(self, rnd: int, updates: Sequence[ClientUpdate]) -> None:
        """Replace the global adapter by the method's aggregate of this round's updates."""
        if not updates:
            return
        ordered = sorted(updates, key=lambda u: u.client_id)  # results never depend on arrival order
        self.global_weights = self.aggregator.aggregate(self.global_weights, ordered)
        self.version += 1


def traffic(plans: Mapping[int, ClientPlan], updates: Sequence[ClientUpdate]) -> RoundTraffic:
    """Bytes of tensor data sent down (plans) and up (updates) in one round, per client: only the
    tensors each plan says travel (FFA-LoRA's frozen `A` does not; FLoRA's stacks do)."""
    return RoundTraffic(
        uplink_bytes_by_client={
            u.client_id: tensor_bytes(plans[u.client_id].uplink(u.weights).values()) for u in updates
        },
        downlink_bytes_by_client={cid: tensor_bytes(p.downlink().values()) for cid, p in plans.items()},
    )
