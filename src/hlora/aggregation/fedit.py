"""FedIT: FedAvg of the LoRA factors (METHOD.md rule 1), the homogeneous baseline.

`A = sum p_k A_k`, `B = sum p_k B_k`. Only defined for equal ranks; biased, since
`B @ A != sum p_k B_k @ A_k` in general.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import factor_mean
from hlora.aggregation.registry import register
from hlora.errors import AggregationError


@register
class FedIT(LayerwiseAggregator):
    name = "fedit"

    def check_ranks(self, client_ranks: Mapping[int, int]) -> None:
        ranks = sorted(set(client_ranks.values()) | {self.bank_rank})
        if len(ranks) > 1:
            raise AggregationError(
                f"fedit averages factors and needs one rank for every client and the server; got ranks "
                f"{ranks}: use a heterogeneous method (e.g. hlora) or a fixed rank policy"
            )

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return factor_mean(pairs, p)
