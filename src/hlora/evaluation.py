"""Scoring an adapter on a labelled split: accuracy, and F1 of the positive class where the task has it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader

from hlora.data.glue import TaskSpec
from hlora.data.tokenize import EncodedSplit
from hlora.models.lora_model import LoraModel
from hlora.weights import AdapterWeights


def task_metrics(task: TaskSpec, labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task.positive_label is not None:
        metrics["f1"] = float(f1_score(labels, predictions, pos_label=task.positive_label, zero_division=0))
    return metrics


CONSTANT_LOGITS = 1e-4  # logits that vary less than this over the rows: one answer whatever the input


def prediction_spread(logits: np.ndarray) -> dict[str, object]:
    """How a model's answers spread over the rows: `predicted_share`, the share of rows given each class
    (by index), and `logit_std`, the standard deviation over the rows of each row's logits centred on
    their own mean, averaged over the classes. A `logit_std` near 0 (below `CONSTANT_LOGITS`) is a model
    that no longer sees its input: every row gets the same logits, as the global model of a federation
    that fell into the majority class can (BENCHMARKS.md, the paper regime's seed 1)."""
    n, classes = logits.shape
    counts = np.bincount(logits.argmax(axis=1), minlength=classes) if n else np.zeros(classes, dtype=int)
    centred = logits - logits.mean(axis=1, keepdims=True)
    return {
        "predicted_share": {str(c): float(counts[c] / n) if n else 0.0 for c in range(classes)},
        "logit_std": float(centred.std(axis=0).mean()) if n else 0.0,
    }


def spread_line(spread: dict[str, object]) -> str:
    """`prediction_spread` in one line: `predicted 0: 29.2%, 1: 70.8%; logit spread 1.6200`, and a
    warning where the logits do not vary."""
    shares = ", ".join(f"{c}: {100 * share:.1f}%" for c, share in spread["predicted_share"].items())
    line = f"predicted {shares}; logit spread {spread['logit_std']:.4f}"
    if spread["logit_std"] < CONSTANT_LOGITS:
        line += " (every row gets the same logits: the model no longer sees its input)"
    return line


FLAT_FEATURES = 1e-3  # a layer whose features vary less than this share over the rows: blind to the input


class _FeatureMoments:
    """Running sums, per hidden state (embeddings, then each layer), of each row's vector averaged over its
    tokens (padding left out): enough for `feature_variation` without keeping any row."""

    def __init__(self) -> None:
        self.rows = 0
        self.total: list[torch.Tensor] = []  # per layer: the sum over rows of the row vectors
        self.square: list[torch.Tensor] = []  # per layer: the sum over rows of their squares, per dimension

    def add(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> None:
        mask = attention_mask.unsqueeze(-1).to(torch.float64)
        pooled = [(h.to(torch.float64) * mask).sum(1) / mask.sum(1).clamp(min=1) for h in hidden_states]
        if not self.total:
            self.total = [torch.zeros(p.shape[1], dtype=torch.float64) for p in pooled]
            self.square = [torch.zeros(p.shape[1], dtype=torch.float64) for p in pooled]
        for i, p in enumerate(pooled):
            self.total[i] += p.sum(0).cpu()
            self.square[i] += (p * p).sum(0).cpu()
        self.rows += len(attention_mask)

    def variation(self) -> list[float] | None:
        if not self.rows:
            return None
        shares = []
        for total, square in zip(self.total, self.square, strict=True):
            mean = total / self.rows
            second = float((square / self.rows).sum())
            variance = float((square / self.rows - mean * mean).clamp(min=0).sum())
            shares.append(variance / second if second > 0 else 0.0)
        return shares


@dataclass(frozen=True)
class Prediction:
    logits: np.ndarray  # n x num_labels, float32, in the rows' order
    # per hidden state (embeddings, then each layer): the share of the token-averaged features' second
    # moment that varies over the rows (total variance over mean squared norm). Near 0 (under
    # `FLAT_FEATURES`): every row reaches that layer as the same vector, and no head can tell them apart.
    # None where not asked for or where the model gives no hidden states.
    feature_variation: list[float] | None = None


@torch.no_grad()
def predict(
    module: nn.Module, data: EncodedSplit, batch_size: int, collate, device, features: bool = False
) -> Prediction:
    """The logits of `module` for every row of `data`, in the rows' order, and with `features` how much
    each layer's features vary over the rows (`Prediction.feature_variation`). Rows are batched by length
    so little padding is computed. Any sequence-classification model will do: hlora's own, or one loaded
    back from an export."""
    module.eval()
    order = np.argsort(data.lengths(), kind="stable")
    chunks = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    logits: np.ndarray | None = None
    moments = _FeatureMoments()
    for idx, batch in zip(chunks, DataLoader(data, batch_sampler=chunks, collate_fn=collate), strict=True):
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = module(**batch, output_hidden_states=True) if features else module(**batch)
        if features and getattr(out, "hidden_states", None) is not None and "attention_mask" in batch:
            moments.add(out.hidden_states, batch["attention_mask"])
        scores = out.logits.float().cpu().numpy()
        if logits is None:
            logits = np.empty((len(data), scores.shape[1]), dtype=np.float32)
        logits[idx] = scores
    if logits is None:  # no rows
        logits = np.empty((0, 1), dtype=np.float32)
    return Prediction(logits, moments.variation() if features else None)


def predict_logits(module: nn.Module, data: EncodedSplit, batch_size: int, collate, device) -> np.ndarray:
    """`predict`'s logits alone."""
    return predict(module, data, batch_size, collate, device).logits


def features_line(variation: list[float]) -> str:
    """`feature_variation` in one line, from the embeddings to the last layer, and a warning where the last
    layer's features no longer vary with the input."""
    line = "features vary by layer, embeddings first: " + " ".join(f"{v:.3g}" for v in variation)
    flat = [i for i, v in enumerate(variation) if v < FLAT_FEATURES]
    if flat and flat[-1] == len(variation) - 1:
        first = next(i for i in range(len(variation)) if all(v < FLAT_FEATURES for v in variation[i:]))
        line += f" (flat from hidden state {first} on: every row reaches the head as the same vector)"
    return line


def evaluate_with_spread(
    model: LoraModel,
    weights: AdapterWeights,
    data: EncodedSplit,
    task: TaskSpec,
    batch_size: int,
    collate,
    features: bool = True,
) -> tuple[dict[str, float], dict[str, object]]:
    """Accuracy (and F1 where the task has it) of `weights` on `data` and, from the same forward passes,
    `prediction_spread` with, where `features` asks and the model gives hidden states, `feature_variation`
    (per layer: `Prediction`)."""
    model.load(weights)
    seen = predict(model.module, data, batch_size, collate, model.device, features=features)
    spread = prediction_spread(seen.logits)
    if seen.feature_variation is not None:
        spread["feature_variation"] = seen.feature_variation
    return task_metrics(task, data.labels, seen.logits.argmax(axis=1)), spread


def evaluate(
    model: LoraModel, weights: AdapterWeights, data: EncodedSplit, task: TaskSpec, batch_size: int, collate
) -> dict[str, float]:
    """Accuracy (and F1 where the task has it) of `weights` on `data`."""
    return evaluate_with_spread(model, weights, data, task, batch_size, collate, features=False)[0]
