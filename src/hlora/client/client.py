"""A federated client: its own rows, and the local trainer it shares with the other clients in-process."""

from __future__ import annotations

from hlora.client.trainer import LocalTrainer
from hlora.data.tokenize import EncodedSplit
from hlora.models.lora_model import LoraModel
from hlora.protocol import ClientPlan, ClientUpdate, TrainResult


def merge_base(model: LoraModel, plan: ClientPlan) -> None:
    """Fold the plan's base deltas into the model's base weights (those it does not hold yet)."""
    for delta in plan.merge:
        model.merge(delta.version, delta.weights)


def apply_plan(model: LoraModel, plan: ClientPlan) -> None:
    """Put `model` in the state the plan starts from: base deltas merged, adapter loaded, `A` frozen
    where the plan says so (what the server evaluates as the model a client holds). A plan's `fold`
    holds for one training only (`FederatedClient.fit`); a plan that has one is refused here."""
    if plan.fold is not None:
        raise ValueError("a plan with a fold holds for one training only, it cannot be applied for good")
    merge_base(model, plan)
    model.load(plan.adapter, train_a=plan.train_a)


class FederatedClient:
    """Does what the server planned for it on its own rows and reports the trained adapter."""

    def __init__(self, client_id: int, data: EncodedSplit, trainer: LocalTrainer) -> None:
        self.client_id = client_id
        self.data = data
        self.trainer = trainer

    def fit(self, plan: ClientPlan, seed: int) -> tuple[ClientUpdate, TrainResult]:
        merge_base(self.trainer.model, plan)
        # The fold is in the base for this training only: later clients and evaluation share the base.
        with self.trainer.model.folded(plan.fold):
            result = self.trainer.train(
                plan.adapter, self.data, seed, desc=f"client {self.client_id}", train_a=plan.train_a
            )
        return ClientUpdate(self.client_id, result.num_samples, result.weights), result
