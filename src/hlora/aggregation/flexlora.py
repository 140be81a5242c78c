"""FlexLoRA (METHOD.md rule 4, NeurIPS 2024), the peer that HLoRA must match in result and beat in cost.

Per adapted weight, the product mean `dW = sum_k p_k B_k @ A_k` is built densely (`m x n`) and
decomposed by a full SVD; the singular values go into `B` (`B = U S`, `A = V^T`), not split evenly as
in HLoRA, so `B @ A` is the same and only the split differs. The components stay in SVD order, so a
client's first `r_k` components (the default `plan_for`) are still the best rank-`r_k` approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import dense_product_svd
from hlora.aggregation.registry import register


@register
class FlexLoRA(LayerwiseAggregator):
    name = "flexlora"
    private_space = "products"  # DP noise on the dense product mean, then this rule's SVD
    order = 10
    secure_refactor = "into_b"  # the two-stage sums give the same product mean's factors

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return dense_product_svd(pairs, p, self.bank_rank)

