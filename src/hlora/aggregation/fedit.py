"""FedIT: FedAvg of the LoRA factors (METHOD.md rule 1), the homogeneous baseline.

`A = sum p_k A_k`, `B = sum p_k B_k`. Only defined for equal ranks; biased, since
`B @ A != sum p_k B_k @ A_k` in general.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hlora.aggregation.base import Aggregator, ClientUpdate, average_dense, client_weights, factor_pairs
from hlora.aggregation.products import factor_mean
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.weights import AdapterWeights, LoraFactors


@register
class FedIT(Aggregator):
    name = "fedit"

    def check_ranks(self, client_ranks: Mapping[int, int]) -> None:
        ranks = sorted(set(client_ranks.values()) | {self.bank_rank})
        if len(ranks) > 1:
            raise AggregationError(
                f"fedit averages factors and needs one rank for every client and the server; got ranks "
                f"{ranks}: use a heterogeneous method (e.g. hlora) or a fixed rank policy"
            )

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for name in global_weights.factors:
            try:
                B, A = factor_mean(factor_pairs(updates, name), p)
            except ValueError as e:
                raise AggregationError(f"fedit cannot average {name}: {e}") from None
            factors[name] = LoraFactors(B, A)
        return AdapterWeights(factors, average_dense(updates, p))
