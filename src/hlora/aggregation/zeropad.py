"""Zero-padding (METHOD.md rule 2, HetLoRA-style), the heterogeneous baseline that HLoRA improves on.

Every client's factors are padded with zeros to the bank rank and averaged; a client of rank `r_k` is
sent the first `r_k` rows of `A` and columns of `B` (the default `plan_for`). Biased like FedIT, and a
component that only high-rank clients train is diluted by the others' zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import normalise_weights, product_norms, zero_pad_mean
from hlora.aggregation.registry import register


@register
class ZeroPad(LayerwiseAggregator):
    name = "zeropad"
    private_space = "factors"  # DP noise on the zero-padded factor mean
    order = 20

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        # HetLoRA's sparsity-weighted aggregation: per adapted weight, client k's factors are weighted by
        # ||B_k @ A_k||_F (normalised) instead of p_k. The head is still averaged with p_k.
        norm_weighting: bool = False

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return zero_pad_mean(pairs, self.layer_weights(pairs, p), self.bank_rank)

    @classmethod
    def private_refusal(cls, options: BaseModel | None) -> str | None:
        if getattr(options, "norm_weighting", False):
            return (
                "method_options.norm_weighting weighs clients by their updates' norms, and DP-FedAvg needs "
                "weights that do not depend on client data"
            )
        return super().private_refusal(options)

    def layer_weights(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> Tensor:
        """The weights of one adapted weight's factors: `p_k`, or with `norm_weighting` the normalised
        `||B_k @ A_k||_F` (falling back to `p_k` where every update is zero, as before any training)."""
        if not self.options.norm_weighting:  # type: ignore[union-attr]
            return normalise_weights(p, len(p))
        norms = product_norms(pairs)
        if not norms.sum() > 0:
            return normalise_weights(p, len(p))
        return normalise_weights(norms.cpu(), len(p))

