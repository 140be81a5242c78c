"""The messages of a round, as both runtimes carry them: what the server asks of a client
(`ClientPlan`, with the `BaseDelta`s it must fold in), what a client reports (`ClientUpdate`, and the
`TrainResult` of its training). The simulation passes them as Python objects; `hlora.flower.wire` encodes
them as Flower records. Nothing here knows how a method aggregates or how a client trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hlora.weights import AdapterWeights


@dataclass(frozen=True)
class ClientUpdate:
    """What one client reports after local training."""

    client_id: int
    num_samples: int  # n_k, the client's training samples: the weight p_k is n_k / sum n_j
    weights: AdapterWeights


@dataclass(frozen=True)
class BaseDelta:
    """An update folded for good into the frozen base weights, `W0 += s * B @ A` (FLoRA's merged stacks).

    `version` numbers a run's deltas 1, 2, ... in the order they must be applied, so that a model which
    already holds a delta (the in-process clients share one base model) does not apply it twice."""

    version: int
    weights: AdapterWeights  # factors only: the stacked update of one round


@dataclass(frozen=True)
class ClientPlan:
    """What the server asks of one client for one round.

    The client folds `merge` into its base weights (oldest first), loads `adapter` (at its rank) and
    trains it; with `train_a` false, every `A` stays frozen and only `B` and the head train. A `fold`
    (Fed-PLoRA) is added to the base weights for this round's training only, `W0 += s * B_f @ A_f`, and
    the exact original weights are restored after it. `downlink()` and `uplink()` say which tensors
    actually travel, and so what the traffic figures count.
    """

    adapter: AdapterWeights  # the adapter the client starts from, at its rank
    train_a: bool = True  # False (FFA-LoRA): A is the shared init, frozen; it neither trains nor travels
    fresh: bool = False  # True (FLoRA): the factors are the run's seeded init, rebuilt by the client
    merge: tuple[BaseDelta, ...] = ()  # deltas to fold into the base weights before training (FLoRA)
    # Factors only: modules held in the base weights for this round's training alone, undone after it
    # (Fed-PLoRA's global modules the client does not train); None for every other method.
    fold: AdapterWeights | None = None

    def downlink(self) -> dict[str, Tensor]:
        """The tensors sent to the client: the deltas it lacks, the round's fold, and the adapter's parts
        it cannot rebuild from the run's seed (no factors when `fresh`, no `A` when it is frozen)."""
        sent = {
            f"merge.{delta.version}.{name}": t
            for delta in self.merge
            for name, t in delta.weights.tensors().items()
        }
        if self.fold is not None:
            sent.update({f"fold.{name}": t for name, t in self.fold.tensors().items()})
        for name, t in self.adapter.tensors().items():
            is_a, is_b = name.endswith(".lora_A"), name.endswith(".lora_B")
            if (self.fresh and (is_a or is_b)) or (is_a and not self.train_a):
                continue
            sent[name] = t
        return sent

    def uplink(self, trained: AdapterWeights) -> dict[str, Tensor]:
        """The tensors the client sends back: what it trained (no frozen `A`)."""
        return {
            name: t for name, t in trained.tensors().items() if self.train_a or not name.endswith(".lora_A")
        }


@dataclass(frozen=True)
class TrainResult:
    """What a client reports of a round's training: its adapter and figures. The server takes the
    figures as claims: `hlora.federation.reports.check_reports` sets each one out of bounds (not a
    number of its kind, not finite, negative, beyond a sane maximum) to None before they enter the
    metrics, so past that check any figure may be None (missing)."""

    weights: AdapterWeights  # the trained adapter, at the rank it started with
    num_samples: int  # rows the client holds (n_k)
    steps: int
    samples_seen: int
    mean_loss: float
    wall_s: float  # the whole call, the adapter's load and read included
    step_s: float  # mean wall seconds per optimizer step (batch, forward, backward, update), no copies
    peak_bytes: int  # peak memory of the local training (hlora.client.cost says what is counted)
    # of which the trainable tensors with their gradients and optimizer state: what grows with the rank,
    # apart from the activations of the client's longest batch
    state_bytes: int = 0
