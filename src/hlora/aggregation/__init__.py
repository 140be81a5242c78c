"""Aggregation: the pure math on tensors (`products`) and one small module per method.

| name       | module        | METHOD.md rule                                                        |
|------------|---------------|-----------------------------------------------------------------------|
| `fedit`    | `fedit.py`    | 1, FedAvg of the factors; equal ranks only                            |
| `zeropad`  | `zeropad.py`  | 2, zero-padding to the bank rank (option: HetLoRA's norm weighting)   |
| `hlora`    | `hlora.py`    | 3, truncated SVD of the product mean through QR, balanced split       |
| `hlora_ef` | `hlora_ef.py` | 3 + error feedback: what the truncation drops joins the next round    |
| `rablock`  | `rablock.py`  | raFLoRA 2602.13486: rank blocks averaged over holders, then 3's QR    |
| `fedplora` | `fedplora.py` | Fed-PLoRA 2602.16936: r_k drawn rank-1 modules train, the rest fold   |
| `flexlora` | `flexlora.py` | 4, the same product mean, dense SVD, singular values in `B`           |
| `flora`    | `flora.py`    | 5, stacking; clients merge the stack into their base, train afresh    |
| `ffa`      | `ffa.py`      | 6, `A` frozen at the shared seeded init; `B` zero-padded and averaged |

A component that comes out of aggregation with zero factors (above the round's total client rank, or
above every reporting client's rank) restarts from the round-0 init (`base.revive_components`): it
leaves `B @ A` unchanged and keeps the component trainable.

Every method implements `base.Aggregator` and registers itself by name with `registry` when its module
is imported, which importing this package does; a method's typed options are its `Options` class.
`instruments` measures any method's aggregate against the exact product mean every round (relative
error, spectrum, energy per rank block), from `Aggregator.global_update`.
`aggregate_products(factors, weights, rank)` is HLoRA's core (METHOD.md rule 3), usable without any
model.
"""

from hlora.aggregation import (  # noqa: F401  (registers the methods)
    fedit,
    fedplora,
    ffa,
    flexlora,
    flora,
    hlora,
    hlora_ef,
    rablock,
    zeropad,
)
from hlora.aggregation.base import Aggregator
from hlora.aggregation.products import aggregate_products

__all__ = ["Aggregator", "aggregate_products"]
