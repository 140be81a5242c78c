"""HLoRA with error feedback (issue 20): what the bank rank's truncation drops is carried to the next round.

HLoRA (METHOD.md rule 3) keeps `G_t = SVD_{r_g}(M_t)` of the exact product mean
`M_t = sum_k p_k B_k @ A_k` per adapted weight and loses the rest. Here the server also keeps the
residual `E_t` of every adapted weight and truncates the mean plus the residual instead:

    G_t = SVD_{r_g}(M_t + E_{t-1}),    E_t = SVD_{e}((M_t + E_{t-1}) - G_t),    E_0 = 0,

`e` the `residual_rank` option. While the residual fits its budget (the second SVD drops nothing,
i.e. `M_t + E_{t-1}` has rank at most `r_g + e`), `E_t = (M_t + E_{t-1}) - G_t` and the rounds telescope:
`sum_t G_t + E_T = sum_t M_t`. Beyond the budget the smallest components of the residual are dropped,
the best rank-`e` approximation of it, and the identity holds only up to them.

Nothing dense is built: `M_t + E_{t-1}` is the stack of HLoRA's QR path with the residual's factors as
one more "client" of weight 1 (not normalised with the `p_k`), and `G_t` and the residual are the leading
`r_g` and the next `e` components of the small core's SVD (`products.truncate_products`). The residual is
kept balanced, `B_E = U sqrt(S)`, `A_E = sqrt(S) V^T`, of rank at most `e`; components at round-off
level are left out, so it has rank 0 while the round's total client rank fits the bank rank.

Source: error feedback for compressed updates (1-bit SGD, Seide et al., Interspeech 2014; EF-SGD,
Karimireddy et al., ICML 2019), which ECLoRA (Ning et al., "Federated fine-tuning on heterogeneous
LoRAs with error-compensated aggregation", IEEE TNNLS 2025, doi 10.1109/TNNLS.2025.3586545) brings to
SVD-based heterogeneous-rank LoRA aggregation (this module follows its abstract, the full text was not
at hand: a randomised SVD whose decomposition error of earlier rounds is added back). Where it departs:
the truncation is HLoRA's exact one through QR, not a randomised SVD, and the residual is held factored
at a bounded rank (`residual_rank`), so its smallest components can be dropped.

Update space. EF-SGD compresses an update `d_t` and keeps `x_t = x_{t-1} + C(d_t + e_{t-1})`,
`e_t = d_t + e_{t-1} - C(d_t + e_{t-1})`. HLoRA's clients send whole adapters, not updates: client `k`
starts from `G_{t-1}` cut to its rank and returns `B_k @ A_k`, so `M_t` is the mean of absolute adapters
and the compressor is applied to the model, not to the step. Written with `d_t = M_t - G_{t-1}`, the rule
above is `G_t = C(G_{t-1} + d_t + E_{t-1})`, `E_t = G_{t-1} + d_t + E_{t-1} - G_t`: EF with a compressor
of the whole model, whose uncompressed shadow `G_t + E_t = E_{t-1} + M_t` moves by exactly the mean step
`d_t` every round (within the budget). What differs: (1) `d_t` includes, for every client below the bank
rank, the components of `G_{t-1}` it was never sent (`M_t` holds them only with the weight of the clients
that hold them), so the feedback carries the truncation of the aggregate but does not undo the cut to
the clients' ranks; (2) the clients never see the residual (it lives on the server alone, so traffic is
HLoRA's); (3) `rel_error` in the instruments measures `G_t` against `M_t`, so it includes the feedback
`E_{t-1} - E_t` as well as the truncation.

`residual_rank` (option, default: the bank rank `r_g`): the most components of the residual kept per
adapted weight, so the server holds at most `r_g + e` components per weight (twice HLoRA's by default,
`e (m + n)` numbers more), and the carried term adds at most `e` to the stack's rank. The bank rank is
the budget because it bounds the residual's cost by the global adapter's own, and it holds everything a
round's truncation drops while the stack's total rank (the round's client ranks plus the carried
residual's) is at most `2 r_g`. `residual_rank = 0`: no feedback, HLoRA bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from hlora.aggregation.base import Aggregator, average_dense, client_weights, factor_pairs, revive_components
from hlora.aggregation.products import aggregate_products, truncate_products
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.protocol import ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors

_PREFIX = "residual."  # state_dict keys: residual.<adapted weight>.lora_A / .lora_B


@register
class HLoRAErrorFeedback(Aggregator):
    name = "hlora_ef"
    order = 5  # right after hlora

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        # The most components of the residual kept per adapted weight; None: the bank rank; 0: no
        # feedback (HLoRA). Beyond it the residual's smallest components are dropped.
        residual_rank: int | None = Field(None, ge=0)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        chosen = self.options.residual_rank  # type: ignore[union-attr]
        self.residual_rank: int = self.bank_rank if chosen is None else chosen
        self.residual: dict[str, LoraFactors] = {}  # E_t per adapted weight; absent: zero

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors: dict[str, LoraFactors] = {}
        residual: dict[str, LoraFactors] = {}
        for layer in global_weights.factors:
            pairs = factor_pairs(updates, layer)
            try:
                if self.residual_rank == 0:
                    B, A = aggregate_products(pairs, p, self.bank_rank)
                else:
                    carried = self.residual.get(layer)
                    cut = truncate_products(
                        pairs,
                        p,
                        self.bank_rank,
                        carry=None if carried is None else (carried.B, carried.A),
                        tail_rank=self.residual_rank,
                    )
                    (B, A), (B_E, A_E) = cut
                    if B_E.shape[1]:
                        if not (torch.isfinite(B_E).all() and torch.isfinite(A_E).all()):
                            raise ValueError("the residual is not finite")
                        residual[layer] = LoraFactors(B_E, A_E)
            except ValueError as e:
                raise AggregationError(f"{self.name} cannot aggregate {layer}: {e}") from None
            if self.initial is not None:
                B, A = revive_components(B, A, self.initial.factors[layer].A)  # B @ A unchanged
            factors[layer] = LoraFactors(B, A)
        self.residual = residual  # only now: a layer that fails leaves the residual of the last round
        return AdapterWeights(factors, average_dense(updates, p))

    def state_dict(self) -> dict[str, Any]:
        """The residual of every adapted weight that has one, as `residual.<weight>.lora_A` / `.lora_B`."""
        flat = AdapterWeights(self.residual).tensors()
        return {_PREFIX + name: t for name, t in flat.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stray = sorted(k for k in state if not k.startswith(_PREFIX))
        if stray:
            raise ValueError(f"{self.name} keeps only its residual, got {', '.join(stray[:3])}")
        if not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{self.name}'s residual must be tensors")
        residual = AdapterWeights.from_tensors({k.removeprefix(_PREFIX): t for k, t in state.items()})
        if residual.dense:
            raise ValueError(f"{self.name}: not a residual: {', '.join(sorted(residual.dense)[:3])}")
        too_big = sorted(name for name, f in residual.factors.items() if f.rank > self.residual_rank)
        if too_big:
            raise ValueError(f"{self.name}: the residual of {too_big[0]} exceeds rank {self.residual_rank}")
        self.residual = dict(residual.factors)
