"""FlexLoRA (METHOD.md rule 4, NeurIPS 2024), the peer that HLoRA must match in result and beat in cost.

Per adapted weight, the product mean `dW = sum_k p_k B_k @ A_k` is built densely (`m x n`) and
decomposed by a full SVD; the singular values go into `B` (`B = U S`, `A = V^T`), not split evenly as
in HLoRA, so `B @ A` is the same and only the split differs. The components stay in SVD order, so a
client's first `r_k` components (the default `plan_for`) are still the best rank-`r_k` approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

from hlora.aggregation.base import Aggregator, ClientUpdate, average_dense, client_weights, factor_pairs
from hlora.aggregation.products import dense_product_svd
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.weights import AdapterWeights, LoraFactors


@register
class FlexLoRA(Aggregator):
    name = "flexlora"

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for name in global_weights.factors:
            try:
                B, A = dense_product_svd(factor_pairs(updates, name), p, self.bank_rank)
            except ValueError as e:
                raise AggregationError(f"flexlora cannot aggregate {name}: {e}") from None
            factors[name] = LoraFactors(B, A)
        return AdapterWeights(factors, average_dense(updates, p))
