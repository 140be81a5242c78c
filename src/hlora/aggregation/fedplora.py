"""Fed-PLoRA (Zhang, Hu, Xu, ICLR 2026, arXiv 2602.16936): parallel one-rank modules, Select-N-Fold.

The global adapter of rank `R` (the bank rank) is read as `R` parallel rank-1 modules,
`B @ A = sum_j B[:, j] A[j, :]`. Each round client `k` of rank `r_k` is given a set `K_k` of `r_k`
distinct modules, drawn uniformly at random without replacement (the paper's random selection), to
train as an ordinary rank-`r_k` adapter (in ascending module order), and the other `R - r_k` modules as
a fold: for this round its base is `W0 + s * sum_{j not in K_k} B_j A_j` (`ClientPlan.fold`, undone after
training), so it starts from the whole global model (no initialisation noise). The server averages each
module over the clients `Q_j` that trained it, factor by factor:

    B_j = sum_{k in Q_j} q_k B_{k,j},   A_j = sum_{k in Q_j} q_k A_{k,j},   q_k = p_k / sum_{i in Q_j} p_i

and a module nobody trained this round keeps its value. With every client at rank `R` there is no fold
and the rule is FedAvg of the factors (FedIT), as the paper says of the homogeneous case.

Departures: the paper averages each module over `Q_j` (its noise bound carries `1 / |Q_j|`); here the
average is weighted by the data weights `p_k` renormalised over `Q_j`, as every method of this project
weighs clients (equal client sizes give the paper's plain mean). The selection is the server's, seeded
per run, round and client (`seeding.selection_seed`), so clients never draw and a run is reproducible;
in the paper the client selects. The paper's scaling is folded as LoRA's own `s = lora_alpha / r`,
which is one `scale` for every rank here. A client's model as the server evaluates it (every rank tier,
`plan_for`) is the whole global adapter at `R`: what every client starts from, folded or trained.
Module-wise factor averaging is no product mean, and the instruments' exact mean `sum p_k B_k A_k` holds
only each client's trained modules, not its fold: their `rel_error` (about 1.5 on MRPC) is no bias figure
for this rule; the revival of zero components (`base.revive_components`) is not applied, since an
untrained module keeps its value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hlora.aggregation.base import Aggregator, average_dense, client_weights
from hlora.aggregation.registry import register
from hlora.errors import AggregationError
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.seeding import selection_seed
from hlora.weights import AdapterWeights, LoraFactors


def select_modules(seed: int, rnd: int, client_id: int, client_rank: int, bank_rank: int) -> list[int]:
    """The `client_rank` distinct modules of `0..bank_rank-1` a client trains in a round, ascending: a
    uniform draw without replacement, seeded by the run seed, the round and the client."""
    if not 1 <= client_rank <= bank_rank:
        raise ValueError(f"client rank {client_rank} is outside 1..{bank_rank}")
    rng = np.random.default_rng(selection_seed(seed, rnd, client_id))
    return sorted(int(j) for j in rng.choice(bank_rank, size=client_rank, replace=False))


def split_modules(
    weights: AdapterWeights, selected: Sequence[int]
) -> tuple[AdapterWeights, AdapterWeights | None]:
    """The adapter of the `selected` modules (in that order, with the head) and the fold of the others
    (factors only, ascending; None where every module is selected)."""
    rank = weights.rank
    keep = torch.as_tensor(list(selected), dtype=torch.long)
    rest = torch.as_tensor([j for j in range(rank) if j not in set(selected)], dtype=torch.long)
    adapter = AdapterWeights(
        {name: LoraFactors(f.B[:, keep], f.A[keep]) for name, f in weights.factors.items()},
        dict(weights.dense),
    )
    if not len(rest):
        return adapter, None
    fold = AdapterWeights({name: LoraFactors(f.B[:, rest], f.A[rest]) for name, f in weights.factors.items()})
    return adapter, fold


def module_mean(
    global_factors: LoraFactors,
    client_factors: Sequence[LoraFactors],
    selections: Sequence[Sequence[int]],
    p: Sequence[float],
) -> LoraFactors:
    """Each module `j` of the global `(B, A)` (`m x R`, `R x n`) averaged over the clients that trained
    it: client `k`'s component `i` is module `selections[k][i]`, weighted by `p_k` renormalised over
    the module's clients. A module no client trained keeps its global value. Raises ValueError for
    factors that do not fit their selection."""
    B, A = global_factors.B, global_factors.A
    R = A.shape[0]
    B_sum = torch.zeros(B.shape, dtype=torch.float64)
    A_sum = torch.zeros(A.shape, dtype=torch.float64)
    mass = torch.zeros(R, dtype=torch.float64)
    for f, sel, w in zip(client_factors, selections, p, strict=True):
        if f.rank != len(sel) or f.B.shape[0] != B.shape[0] or f.A.shape[1] != A.shape[1]:
            raise ValueError(
                f"factors B {tuple(f.B.shape)}, A {tuple(f.A.shape)} do not fit {len(sel)} modules of "
                f"B {tuple(B.shape)}, A {tuple(A.shape)}"
            )
        idx = torch.as_tensor(list(sel), dtype=torch.long)
        if len(set(sel)) != len(sel) or not all(0 <= j < R for j in sel):
            raise ValueError(f"selection {list(sel)} is not distinct modules of 0..{R - 1}")
        B_sum[:, idx] += float(w) * f.B.double()
        A_sum[idx] += float(w) * f.A.double()
        mass[idx] += float(w)
    trained = mass > 0
    scale = torch.where(trained, mass, torch.ones_like(mass))
    B_new = torch.where(trained[None, :], B_sum / scale[None, :], B.double()).to(B.dtype)
    A_new = torch.where(trained[:, None], A_sum / scale[:, None], A.double()).to(A.dtype)
    return LoraFactors(B_new, A_new)


@register
class FedPLoRA(Aggregator):
    name = "fedplora"
    order = 7

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # client id -> the modules it was planned to train, for the round configured last. Not state: a
        # checkpoint follows aggregate, and the next round's plans draw afresh.
        self.selections: dict[int, list[int]] = {}

    def plan_for(self, global_weights: AdapterWeights, client_rank: int, synced: int = 0) -> ClientPlan:
        """The model a client of any rank holds as the server evaluates it: the whole global adapter
        (its training starts from the same function, part trained and part folded)."""
        return ClientPlan(global_weights)

    def plan_client(
        self, global_weights: AdapterWeights, client_rank: int, synced: int, *, client_id: int, rnd: int
    ) -> ClientPlan:
        selected = select_modules(self.seed, rnd, client_id, client_rank, global_weights.rank)
        self.selections[client_id] = selected
        adapter, fold = split_modules(global_weights, selected)
        return ClientPlan(adapter, fold=fold)

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        # A client without a plan of this aggregator (a direct call) holds the first r_k modules, as the
        # default plan would have given it.
        selections = [self.selections.get(u.client_id, list(range(_rank(u)))) for u in updates]
        factors = {}
        for layer, g in global_weights.factors.items():
            try:
                factors[layer] = module_mean(g, [u.weights.factors[layer] for u in updates], selections, p)
            except (ValueError, KeyError) as e:
                raise AggregationError(f"{self.name} cannot aggregate {layer}: {e}") from None
        return AdapterWeights(factors, average_dense(updates, p))


def _rank(update: ClientUpdate) -> int:
    try:
        return update.weights.rank
    except ValueError as e:
        raise AggregationError(f"fedplora cannot aggregate client {update.client_id}: {e}") from None
