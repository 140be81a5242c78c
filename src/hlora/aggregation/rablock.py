"""Rank-block averaging (raFLoRA, Wu, Hu, Min and Wang, arXiv 2602.13486): each rank block of the
update is averaged over the clients that hold it, so the components only high-rank clients train are not
diluted by the weights of the clients that lack them.

Why: HLoRA's product mean weighs every client by `p_k` over all clients, so component `i` gets the
total weight of the clients of rank above `i` only; after the SVD re-factoring the global update's
energy gathers round after round in the components every client holds ("rank collapse": in
`results/mrpc-paper/runs/hlora-s0`, 97.8% of the energy is in block 0-2 of tiers 2/4/8/16 by round 10).

Rule, per adapted weight: the round's distinct client ranks `e_1 < ... < e_L` cut the components into
blocks `[0, e_1), [e_1, e_2), ..., [e_{L-1}, e_L)`; client `k` of rank `r_k` holds the blocks ending at
or below `r_k` (its components `0..r_k-1` are aligned with the others', since every client starts from the
global adapter's leading components). With `w_kb = p_k / sum_{j holds b} p_j` (the data weights
renormalised over the block's holders),

    G = sum_b sum_{k holds b} w_kb B_k[:, b] @ A_k[b, :]

re-factored at the bank rank by a truncated SVD through QR of the weighted stack (never the dense
`m x n` matrix; `products.aggregate_rank_blocks`), split evenly as in HLoRA. A client of rank `r_k` gets
the first `r_k` components (the default `plan_for`). With one rank for all there is one block and
`G` is HLoRA's product mean. The method keeps no state across rounds: the blocks and weights come from
the round's updates alone, so a resumed run needs nothing beyond the global adapter. The instruments'
`rel_error` (against the plain product mean) is non-zero with mixed ranks by design: it measures the
reweighting of the high blocks, not an error of the computation.

Where it departs from the paper: raFLoRA cuts partitions at the federation's rank configuration and
weighs each partition by the clients' "effective contributions" to it; here the blocks are the distinct
ranks of the round's accepted updates (a tier absent from a round, or whose updates were refused, adds
no boundary, so every block has at least one holder) and the contribution of a holder is its data weight
`p_k` renormalised over the holders (the server's own partition sizes, as for every method here; no
per-block norm or gradient estimate). The paper re-factors by SVD; the QR path gives the same truncated
SVD. PreLort (arXiv 2606.15963) averages each rank segment over its contributors too, but on the factors
(a zero-padding average without the other clients' zeros) and with prefix-nested local training, which
this method does not change; RB-LoRA / RA-LoRA (EACL 2026 Findings) were not available to compare.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hlora.aggregation.base import LayerwiseAggregator
from hlora.aggregation.products import aggregate_rank_blocks
from hlora.aggregation.registry import register


@register
class RankBlock(LayerwiseAggregator):
    name = "rablock"
    order = 6

    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        return aggregate_rank_blocks(pairs, p, self.bank_rank)
