"""FFA-LoRA (METHOD.md rule 6, ICLR 2024): `A` frozen at one shared seeded init, only `B` trains.

Every `A` is the run's round-0 init at the bank rank, which every party rebuilds from the seed, so it
never travels; client `k` trains `B_k` against the first `r_k` rows of it. The server zero-pads the
`B_k` and averages them. Since `A` is shared, `B @ A = sum p_k B_k @ A[:r_k]` exactly, and each client
sends and receives only `B` and the head: half of LoRA's traffic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from hlora.aggregation.base import Aggregator, average_dense, client_weights, padded_factor_mean
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors


@register
class FFALoRA(Aggregator):
    name = "ffa"
    order = 40
    private_space = "factors"  # DP noise on the padded mean of B (A is shared, frozen, noise-free)

    def plan_for(self, global_weights: AdapterWeights, client_rank: int, synced: int = 0) -> ClientPlan:
        return ClientPlan(global_weights.truncate(client_rank), train_a=False)

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for layer, shared in global_weights.factors.items():
            B = shared.B.new_zeros(shared.B.shape, dtype=shared.B.dtype)
            for w, u in zip(p, updates, strict=True):
                Bk = u.weights.factors[layer].B
                if Bk.shape[0] != B.shape[0] or Bk.shape[1] > B.shape[1]:
                    raise AggregationError(
                        f"{self.name} cannot aggregate {layer}: client {u.client_id} sent B of shape "
                        f"{tuple(Bk.shape)}, the shared A fits {B.shape[0]} x (rank <= {B.shape[1]})"
                    )
                B[:, : Bk.shape[1]] += w * Bk.to(B.dtype)
            factors[layer] = LoraFactors(B, shared.A)
        return AdapterWeights(factors, average_dense(updates, p))

    def from_noisy_mean(
        self, global_weights: AdapterWeights, layers: Mapping[str, Tensor], dense: Mapping[str, Tensor]
    ) -> AdapterWeights:
        return padded_factor_mean(self, global_weights, layers, dense, revive=False)  # A never changes
