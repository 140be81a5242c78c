"""FedIT: FedAvg of the LoRA factors (METHOD.md rule 1), the homogeneous baseline.

`A = sum p_k A_k`, `B = sum p_k B_k`. Only defined for equal ranks; biased, since
`B @ A != sum p_k B_k @ A_k` in general.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import factor_mean
from hlora.aggregation.registry import register


@register
class FedIT(LayerwiseAggregator):
    name = "fedit"
    equal_ranks = True  # it averages factors, which only line up at one rank
    reference = True  # FedAvg at one rank, the identity on one update: the references' rule
    private_space = "factors"  # DP noise on the zero-padded factor mean
    order = 50

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return factor_mean(pairs, p)

