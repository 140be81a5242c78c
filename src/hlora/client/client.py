"""A federated client: its own rows, and the local trainer it shares with the other clients in-process."""

from __future__ import annotations

from hlora.aggregation.base import ClientPlan, ClientUpdate
from hlora.client.trainer import LocalTrainer, TrainResult
from hlora.data.tokenize import EncodedSplit


class FederatedClient:
    """Trains the adapter the server planned for it on its own rows and reports the result."""

    def __init__(self, client_id: int, data: EncodedSplit, trainer: LocalTrainer) -> None:
        self.client_id = client_id
        self.data = data
        self.trainer = trainer

    def fit(self, plan: ClientPlan, seed: int) -> tuple[ClientUpdate, TrainResult]:
        result = self.trainer.train(plan.adapter, self.data, seed, desc=f"client {self.client_id}")
        return ClientUpdate(self.client_id, result.num_samples, result.weights), result
