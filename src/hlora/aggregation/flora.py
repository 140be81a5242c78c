"""FLoRA (METHOD.md rule 5, NeurIPS 2024): stack the clients' adapters and merge the stack into the base.

Per adapted weight the server stacks `B* = [B_1 ... B_K]`, `A* = [p_1 A_1; ...; p_K A_K]`, so that
`B* @ A* = sum p_k B_k @ A_k` exactly, and every client folds the stack into its base weights before it
trains a fresh adapter (the run's seeded init, `B = 0`) at its own rank. The stack's rank is the round's
total client rank, so the download grows with the number of clients; a client that missed rounds is sent
every stack it lacks. The global adapter the server keeps is the fresh one with the averaged head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hlora.aggregation.base import Aggregator, average_dense, client_weights, factor_pairs
from hlora.aggregation.products import stack_factors
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.protocol import BaseDelta, ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors


@register
class FLoRA(Aggregator):
    name = "flora"
    order = 30

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deltas: list[BaseDelta] = []  # every round's stack, in order (version = position + 1)

    def plan_for(self, global_weights: AdapterWeights, client_rank: int, synced: int = 0) -> ClientPlan:
        return ClientPlan(
            global_weights.truncate(client_rank), fresh=True, merge=tuple(self.deltas[synced:])
        )

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        stack = {}
        for layer in global_weights.factors:
            try:
                stack[layer] = LoraFactors(*stack_factors(factor_pairs(updates, layer), p))
            except ValueError as e:
                raise AggregationError(f"{self.name} cannot aggregate {layer}: {e}") from None
        self.deltas.append(BaseDelta(len(self.deltas) + 1, AdapterWeights(stack)))
        # The global adapter stays the fresh one (the round-0 init, B = 0): the update lives in the base.
        return AdapterWeights(global_weights.factors, average_dense(updates, p))

    def global_update(self, result: AdapterWeights) -> Mapping[str, LoraFactors]:
        """The round's stack, which the clients merge into their base (the global adapter is fresh)."""
        return self.deltas[-1].weights.factors

    def state_dict(self) -> dict[str, Any]:
        """Every round's stack, as a block (`delta.<version>`: name -> tensor; it never changes once made,
        so a checkpoint writes each once), and their number (`deltas`)."""
        blocks = {f"delta.{d.version}": d.weights.tensors() for d in self.deltas}
        return {"deltas": len(self.deltas), **blocks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        deltas = []
        for version in range(1, int(state.get("deltas", 0)) + 1):
            tensors = state.get(f"delta.{version}")
            if tensors is None:  # a checkpoint of format 1: each stack's tensors as `deltas.<version>.<name>`
                prefix = f"deltas.{version}."
                tensors = {k.removeprefix(prefix): t for k, t in state.items() if k.startswith(prefix)}
            if not tensors:
                raise ValueError(f"{self.name} state lacks base delta {version}")
            deltas.append(BaseDelta(version, AdapterWeights.from_tensors(tensors)))
        self.deltas = deltas
