"""The one interface every aggregation method implements.

A method decides three things: what global adapter a run starts from, what each client is sent for a
round (`plan_for`), and how the clients' trained adapters become the next global adapter
(`aggregate`). Runtimes call only these; they never ask which method they are running.

A method with settings declares them as a pydantic model in its `Options` class attribute (extra keys
forbidden); the config's `[method_options]` table is validated against it and the instance arrives as
`self.options`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel
from torch import Tensor

from hlora.errors import AggregationError
from hlora.weights import AdapterWeights, LoraFactors, weighted_mean


@dataclass(frozen=True)
class ClientUpdate:
    """What one client reports after local training."""

    client_id: int
    num_samples: int  # n_k, the client's training samples: the weight p_k is n_k / sum n_j
    weights: AdapterWeights


@dataclass(frozen=True)
class ClientPlan:
    """What the server sends one client for one round: the adapter it starts from, at its rank."""

    adapter: AdapterWeights


class Aggregator(ABC):
    """Base class of the aggregation methods (one small module each, registered by name)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None  # the method's typed options; None: it takes none

    def __init__(self, bank_rank: int, seed: int = 0, options: BaseModel | None = None) -> None:
        self.bank_rank = bank_rank  # r_g, the rank of the global adapter the server keeps
        self.seed = seed
        if options is None and self.Options is not None:
            options = self.Options()  # the defaults
        self.options = options

    def check_ranks(self, client_ranks: Mapping[int, int]) -> None:
        """Refuse a rank assignment this method cannot serve (raise AggregationError); by default
        every assignment is served."""
        return None

    def initial_global(self, init: AdapterWeights) -> AdapterWeights:
        """The global adapter of round 0, from the model's freshly initialised one at `bank_rank`."""
        return init

    def plan_for(self, global_weights: AdapterWeights, client_rank: int) -> ClientPlan:
        """What a client of rank `client_rank` starts the round from: by default the global adapter's
        first `client_rank` components."""
        return ClientPlan(global_weights.truncate(client_rank))

    @abstractmethod
    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        """The next global adapter (at `bank_rank`) from this round's client updates."""


class LayerwiseAggregator(Aggregator):
    """A method that combines each adapted weight's client factors on their own (FedIT, zero-padding,
    HLoRA, FlexLoRA): it states its rule in `combine`; the loop over layers, the weights `p_k` and the
    head's average are shared."""

    @abstractmethod
    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        """The global `(B, A)` of one adapted weight from the clients' `(B_k, A_k)` and weights `p_k`.
        Raises ValueError for factors the rule cannot combine."""

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for layer in global_weights.factors:
            try:
                B, A = self.combine(factor_pairs(updates, layer), p)
            except ValueError as e:
                raise AggregationError(f"{self.name} cannot aggregate {layer}: {e}") from None
            factors[layer] = LoraFactors(B, A)
        return AdapterWeights(factors, average_dense(updates, p))


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that reported this round."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("client updates carry no training samples")
    return [u.num_samples / total for u in updates]


def factor_pairs(updates: Sequence[ClientUpdate], layer: str) -> list[tuple[Tensor, Tensor]]:
    """The clients' `(B_k, A_k)` for one adapted weight, in update order (the input of `products`)."""
    return [(u.weights.factors[layer].B, u.weights.factors[layer].A) for u in updates]


def average_dense(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, Tensor]:
    """The p-weighted mean of the non-LoRA trained tensors (the head): the same in every method."""
    names = updates[0].weights.dense.keys()
    return {name: weighted_mean([u.weights.dense[name] for u in updates], weights) for name in names}
