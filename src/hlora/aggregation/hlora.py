"""HLoRA (METHOD.md rule 3), the project's method: aggregate the products, not the factors.

Per adapted weight, `dW = sum_k p_k B_k @ A_k` is the exact weighted mean of the clients' updates; it is
re-factored at the bank rank by a truncated SVD through QR of the stacked factors (never the dense
`m x n` matrix) and split evenly, `B = U sqrt(S)`, `A = sqrt(S) V^T`. A client of rank `r_k` gets the
first `r_k` components (the default `plan_for`), the best rank-`r_k` approximation of `dW`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import aggregate_products
from hlora.aggregation.registry import register


@register
class HLoRA(LayerwiseAggregator):
    name = "hlora"
    private_space = "products"  # DP noise on the dense product mean, then this rule's SVD
    order = 0
    same_update_as = "flexlora"  # the same truncated SVD of the product mean, built densely
    secure_refactor = "balanced"  # the two-stage sums give the same product mean's factors

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return aggregate_products(pairs, p, self.bank_rank)

