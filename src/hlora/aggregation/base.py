"""The one interface every aggregation method implements.

A method decides three things: what global adapter a run starts from, what each client is sent for a
round (`plan_for`), and how the clients' trained adapters become the next global adapter
(`aggregate`). Runtimes call only these; they never ask which method they are running. What a method
needs of its clients beyond a starting adapter (FLoRA's fresh adapters over merged base weights,
FFA-LoRA's frozen shared `A`) is said in the `ClientPlan`, which also says which tensors travel.

A method with settings declares them as a pydantic model in its `Options` class attribute (extra keys
forbidden); the config's `[method_options]` table is validated against it and the instance arrives as
`self.options`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import Tensor

from hlora.aggregation.products import normalise_weights
from hlora.errors import AggregationError
from hlora.protocol import ClientPlan, ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors, weighted_mean


class Aggregator(ABC):
    """Base class of the aggregation methods (one small module each, registered by name)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None  # the method's typed options; None: it takes none
    # Capabilities: what the engine, `hlora compare` and the report ask of a method, never its name.
    # One rank for every client and the server, or none served (`check_ranks` refuses mixed ranks).
    equal_ranks: ClassVar[bool] = False
    # The rule of the references (centralised, local, one rank for all): the identity on one update and
    # plain FedAvg at one rank. Exactly one registered method has it (`registry.reference()`).
    reference: ClassVar[bool] = False
    # Place in listings, comparisons and tables (`registry.ordered()`): the subject of the comparisons
    # first, then its closest rivals; ties by name.
    order: ClassVar[int] = 100
    # The method that computes the same global update by another path (HLoRA: "flexlora", the dense SVD
    # of the same product mean), or None: `hlora bench aggregation` checks that the two agree and
    # compares their cost.
    same_update_as: ClassVar[str | None] = None
    # Secure aggregation (`[secure]`, `hlora.secure.two_stage`): what the final SVD of a secure round does
    # with the singular values, `Z = U_z S V^T` of the sums: "balanced" (`B = Q U_z sqrt(S)`,
    # `A = sqrt(S) V^T`) or "into_b" (`B = Q U_z S`, `A = V^T`). None: the method cannot be computed from
    # sums of client contributions alone (its rule needs each update), and `[secure]` refuses it.
    secure_refactor: ClassVar[Literal["balanced", "into_b"] | None] = None
    # Where client-level differential privacy (`hlora.privacy`, DP-FedAvg) can clip, average and noise
    # this method's updates: "products" (the change `B_k A_k - B0_k A0_k` of each adapted weight: the
    # rules that aggregate the product mean), "factors" (the change of the travelling tensors, zero-padded:
    # the linear rules), or None (no private path: [privacy] is refused). A method that has one turns the
    # noisy mean into its next global adapter in `from_noisy_mean`.
    private_space: ClassVar[Literal["products", "factors"] | None] = None

    def __init__(self, bank_rank: int, seed: int = 0, options: BaseModel | None = None) -> None:
        self.bank_rank = bank_rank  # r_g, the rank of the global adapter the server keeps
        self.seed = seed
        if options is None and self.Options is not None:
            options = self.Options()  # the defaults
        self.options = options
        self.initial: AdapterWeights | None = None  # the round-0 adapter, set by initial_global

    def check_ranks(self, client_ranks: Mapping[int, int]) -> None:
        """Refuse a rank assignment this method cannot serve (raise AggregationError): mixed ranks for a
        method of `equal_ranks`; every other assignment is served unless a method says otherwise."""
        ranks = sorted(set(client_ranks.values()) | {self.bank_rank})
        if self.equal_ranks and len(ranks) > 1:
            raise AggregationError(
                f"{self.name} needs one rank for every client and the server; got ranks {ranks}: use a "
                "method for mixed ranks (`hlora methods`) or a fixed rank policy"
            )

    def initial_global(self, init: AdapterWeights) -> AdapterWeights:
        """The global adapter of round 0, from the model's freshly initialised one at `bank_rank` (seeded,
        so every party of a run can rebuild it). Subclasses that override this call it first."""
        self.initial = init
        return init

    def plan_for(self, global_weights: AdapterWeights, client_rank: int, synced: int = 0) -> ClientPlan:
        """What a client of rank `client_rank` is asked to do this round: by default, start from the
        global adapter's first `client_rank` components.

        `synced` is the number of aggregations the server had made when this client last received a
        plan (0: never), for methods whose clients keep state between rounds (FLoRA's merged base).
        """
        return ClientPlan(global_weights.truncate(client_rank))

    def plan_client(
        self, global_weights: AdapterWeights, client_rank: int, synced: int, *, client_id: int, rnd: int
    ) -> ClientPlan:
        """The plan of one client of the round `rnd` (what `FederatedServer.configure` asks for): by
        default `plan_for`, which depends on the rank alone. A method whose plan differs per client and
        round (Fed-PLoRA's seeded choice of modules) overrides this; `plan_for` then stays the plan of a
        client of that rank as the server evaluates it (`FederatedServer.model_plan`)."""
        return self.plan_for(global_weights, client_rank, synced)

    @abstractmethod
    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        """The next global adapter (at `bank_rank`) from this round's client updates."""

    @classmethod
    def private_refusal(cls, options: BaseModel | None) -> str | None:
        """Why [privacy] cannot run this method with these options (one line), or None where it can."""
        if cls.private_space is None:
            return (
                "its aggregate is not a mean of the clients' changes in product or factor space, so the "
                "DP mechanism (clip each change, average with fixed weights, add noise) does not apply; "
                "use a method with a private path (`hlora methods`)"
            )
        return None

    def from_noisy_mean(
        self, global_weights: AdapterWeights, layers: Mapping[str, Tensor], dense: Mapping[str, Tensor]
    ) -> AdapterWeights:
        """The next global adapter (at `bank_rank`) from the DP mechanism's noisy mean
        (`hlora.privacy.mechanism`): post-processing, so whatever it does keeps the guarantee.

        For `private_space = "products"`, `layers` maps each adapted weight to the noisy dense mean
        `dW` (`m x n`); for "factors", each travelling factor, named as `AdapterWeights.tensors()` names
        it (`<layer>.lora_A`, `<layer>.lora_B`), to its noisy zero-padded mean at `bank_rank`. `dense`
        is the noisy mean of the head. Only methods with a `private_space` implement it."""
        raise NotImplementedError(f"{self.name} has no private path (private_space is None)")

    def global_update(self, result: AdapterWeights) -> Mapping[str, LoraFactors]:
        """The update this round's aggregate stands for, per adapted weight, in the clients' adapter space:
        what the rule made of the clients' products (`aggregation.instruments` measures it against their
        exact mean). By default the factors of the global adapter `aggregate` just returned."""
        return result.factors

    def state_dict(self) -> dict[str, Any]:
        """What this method has gathered over the rounds beyond the global adapter, for a checkpoint:
        name -> a tensor, a JSON value, or a block: a mapping of names to tensors that the method never
        changes once it has returned it under that name (FLoRA's stack of a round), which a checkpoint
        writes once instead of every round. By default nothing: a method's settings come from the config,
        and `initial` is rebuilt from the seed."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned, into a method built from the same config. Raises
        ValueError for a state this method cannot have written."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got {', '.join(sorted(state)[:3])}")


class LayerwiseAggregator(Aggregator):
    """A method that combines each adapted weight's client factors on their own (FedIT, zero-padding,
    HLoRA, FlexLoRA): it states its rule in `combine`; the loop over layers, the weights `p_k` and the
    head's average are shared."""

    @abstractmethod
    def combine(self, pairs: Sequence[tuple[Tensor, Tensor]], p: Sequence[float]) -> tuple[Tensor, Tensor]:
        """The global `(B, A)` of one adapted weight from the clients' `(B_k, A_k)` and weights `p_k`.
        Raises ValueError for factors the rule cannot combine."""

    def from_noisy_mean(
        self, global_weights: AdapterWeights, layers: Mapping[str, Tensor], dense: Mapping[str, Tensor]
    ) -> AdapterWeights:
        """The product rules re-factor each noisy dense mean with `combine`; the linear rules take the
        noisy padded factors (both then restart dead components, as `aggregate` does)."""
        if self.private_space == "products":
            return refactor_dense_mean(self, global_weights, layers, dense)
        if self.private_space == "factors":
            return padded_factor_mean(self, global_weights, layers, dense)
        return super().from_noisy_mean(global_weights, layers, dense)

    def aggregate(self, global_weights: AdapterWeights, updates: Sequence[ClientUpdate]) -> AdapterWeights:
        p = client_weights(updates)
        factors = {}
        for layer in global_weights.factors:
            try:
                B, A = self.combine(factor_pairs(updates, layer), p)
            except ValueError as e:
                raise AggregationError(f"{self.name} cannot aggregate {layer}: {e}") from None
            if self.initial is not None:
                B, A = revive_components(B, A, self.initial.factors[layer].A)
            factors[layer] = LoraFactors(B, A)
        return AdapterWeights(factors, average_dense(updates, p))


def refactor_dense_mean(
    aggregator: LayerwiseAggregator,
    global_weights: AdapterWeights,
    layers: Mapping[str, Tensor],
    dense: Mapping[str, Tensor],
) -> AdapterWeights:
    """`from_noisy_mean` of the product rules (`private_space = "products"`): each noisy dense mean `dW`
    re-factored at the bank rank by the rule's own `combine` (HLoRA: `aggregate_products`, FlexLoRA:
    `dense_product_svd`), given as the one pair `(dW, I_n)` (or `(I_m, dW)`, the smaller identity) of
    weight 1. Its rank is `min(m, n)`, so both take their dense SVD path, with the rule's sign convention,
    round-off cut and split; then the components left zero are restarted (`revive_components`) as after a
    plain aggregate."""
    factors = {}
    for layer, shared in global_weights.factors.items():
        dW = layers[layer]
        m, n = dW.shape
        eye = torch.eye(min(m, n), dtype=dW.dtype, device=dW.device)
        pair = (eye, dW) if m <= n else (dW, eye)
        B, A = aggregator.combine([pair], [1.0])
        B, A = B.to(shared.B.dtype), A.to(shared.A.dtype)
        if aggregator.initial is not None:
            B, A = revive_components(B, A, aggregator.initial.factors[layer].A)
        factors[layer] = LoraFactors(B, A)
    head = {name: dense[name].to(t.dtype) for name, t in global_weights.dense.items()}
    return AdapterWeights(factors, head)


def padded_factor_mean(
    aggregator: Aggregator,
    global_weights: AdapterWeights,
    layers: Mapping[str, Tensor],
    dense: Mapping[str, Tensor],
    revive: bool = True,
) -> AdapterWeights:
    """`from_noisy_mean` of the linear rules (`private_space = "factors"`): the noisy padded factors
    as the global adapter, the tensors that do not travel (FFA-LoRA's frozen `A`) kept from
    `global_weights`; with `revive`, the components whose `A` row is all zero restarted as after a plain
    aggregate (`revive_components`)."""
    flat = dict(global_weights.tensors())
    for name, t in [*layers.items(), *dense.items()]:
        flat[name] = t.to(flat[name].dtype)
    result = AdapterWeights.from_tensors(flat)
    if not revive or aggregator.initial is None:
        return result
    factors = {}
    for layer, f in result.factors.items():
        factors[layer] = LoraFactors(*revive_components(f.B, f.A, aggregator.initial.factors[layer].A))
    return AdapterWeights(factors, result.dense)


def revive_components(B: Tensor, A: Tensor, init_A: Tensor) -> tuple[Tensor, Tensor]:
    """Restart every component whose `A` row is all zero from the round-0 init: that row of `A` becomes
    the init's, and the column of `B` is zeroed (it multiplied a zero row, so `B @ A` is unchanged).

    A component can come out of aggregation with zero factors (HLoRA and FlexLoRA above the round's total
    client rank, zero-padding above every reporting client's rank). Left so, it could never train again:
    with `A` row and `B` column both zero, both gradients are zero. Restarted, it trains like fresh LoRA.
    """
    dead = ~A.abs().amax(dim=1).gt(0)
    if not bool(dead.any()):
        return B, A
    A = torch.where(dead[:, None], init_A[: A.shape[0]].to(A), A)
    B = torch.where(dead[None, :], torch.zeros_like(B), B)
    return B, A


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that reported this round, computed so that no finite `n_k`
    overflows (`products.normalise_weights`). The server sets each `n_k` from its own partition, not
    from the client's claim (`FederatedServer.aggregate`). Raises ValueError for weights that are not
    finite numbers >= 0 with a positive sum."""
    if not updates:
        raise ValueError("no client updates to weigh")
    try:
        return normalise_weights([u.num_samples for u in updates], len(updates)).tolist()
    except ValueError as e:
        raise ValueError(f"client updates carry no usable training sample counts: {e}") from None


def factor_pairs(updates: Sequence[ClientUpdate], layer: str) -> list[tuple[Tensor, Tensor]]:
    """The clients' `(B_k, A_k)` for one adapted weight, in update order (the input of `products`)."""
    return [(u.weights.factors[layer].B, u.weights.factors[layer].A) for u in updates]


def average_dense(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, Tensor]:
    """The p-weighted mean of the non-LoRA trained tensors (the head): the same in every method."""
    names = updates[0].weights.dense.keys()
    return {name: weighted_mean([u.weights.dense[name] for u in updates], weights) for name in names}
