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


def predict(
    model: LoraModel, weights: AdapterWeights, data: EncodedSplit, batch_size: int, collate
) -> np.ndarray:
    """Predicted label per row of `data`."""
    model.load(weights)
    return predict_logits(model.module, data, batch_size, collate, model.device).argmax(axis=1)


def evaluate(
    model: LoraModel, weights: AdapterWeights, data: EncodedSplit, task: TaskSpec, batch_size: int, collate
) -> dict[str, float]:
    """Accuracy (and F1 where the task has it) of `weights` on `data`."""
    return task_metrics(task, data.labels, predict(model, weights, data, batch_size, collate))
