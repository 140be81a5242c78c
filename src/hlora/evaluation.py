"""Scoring an adapter on a labelled split: accuracy, and F1 of the positive class where the task has it."""

from __future__ import annotations

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


@torch.no_grad()
def predict_logits(module: nn.Module, data: EncodedSplit, batch_size: int, collate, device) -> np.ndarray:
    """Logits (`n x num_labels`, float32) of `module` for every row of `data`, in the rows' order. Rows
    are batched by length so little padding is computed. Any sequence-classification model will do: hlora's
    own, or one loaded back from an export."""
    module.eval()
    order = np.argsort(data.lengths(), kind="stable")
    chunks = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    logits: np.ndarray | None = None
    for idx, batch in zip(chunks, DataLoader(data, batch_sampler=chunks, collate_fn=collate), strict=True):
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = module(**batch).logits.float().cpu().numpy()
        if logits is None:
            logits = np.empty((len(data), out.shape[1]), dtype=np.float32)
        logits[idx] = out
    return logits if logits is not None else np.empty((0, 1), dtype=np.float32)  # no rows


def evaluate_with_spread(
    model: LoraModel, weights: AdapterWeights, data: EncodedSplit, task: TaskSpec, batch_size: int, collate
) -> tuple[dict[str, float], dict[str, object]]:
    """Accuracy (and F1 where the task has it) of `weights` on `data` and, from the same logits,
    `prediction_spread`."""
    model.load(weights)
    logits = predict_logits(model.module, data, batch_size, collate, model.device)
    return task_metrics(task, data.labels, logits.argmax(axis=1)), prediction_spread(logits)


def evaluate(
    model: LoraModel, weights: AdapterWeights, data: EncodedSplit, task: TaskSpec, batch_size: int, collate
) -> dict[str, float]:
    """Accuracy (and F1 where the task has it) of `weights` on `data`."""
    return evaluate_with_spread(model, weights, data, task, batch_size, collate)[0]
