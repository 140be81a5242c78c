"""HLoRA (METHOD.md rule 3), the project's method: aggregate the products, not the factors.

Per adapted weight, `dW = sum_k p_k B_k @ A_k` is the exact weighted mean of the clients' updates; it is
re-factored at the bank rank by a truncated SVD through QR of the stacked factors (never the dense
`m x n` matrix) and split evenly, `B = U sqrt(S)`, `A = sqrt(S) V^T`. A client of rank `r_k` gets the
first `r_k` components (the default `plan_for`), the best rank-`r_k` approximation of `dW`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hlora.aggregation.base import Aggregator, ClientUpdate, average_dense, client_weights, factor_pairs
from hlora.aggregation.products import aggregate_products
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.weights import AdapterWeights, LoraFactors


@register
class HLoRA(Aggregator):
    name = "hlora"

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for name in global_weights.factors:
            try:
                B, A = aggregate_products(factor_pairs(updates, name), p, self.bank_rank)
            except ValueError as e:
                raise AggregationError(f"hlora cannot aggregate {name}: {e}") from None
            factors[name] = LoraFactors(B, A)
        return AdapterWeights(factors, average_dense(updates, p))
