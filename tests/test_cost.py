"""The client cost meter: what it counts on the CPU, and that a higher rank costs more memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hlora.client.cost import PeakMemoryMeter, frozen_base_bytes, tensor_storage_bytes, training_copies
from hlora.client.trainer import make_optimizer
from hlora.config import LoraSettings, TrainSettings
from hlora.models.lora_model import LoraModel

from .conftest import tiny_bert


def one_step(model: LoraModel, rank: int, batch: dict[str, torch.Tensor]) -> PeakMemoryMeter:
    model.load(model.initial_weights(rank, seed=0))
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, TrainSettings())
    meter = PeakMemoryMeter(model.module, params, "adamw")
    model.module.train()
    with meter.step():
        model.module(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return meter


def test_peak_memory_grows_with_rank_for_the_same_batch():
    model = LoraModel(tiny_bert(vocab_size=100), LoraSettings(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 100, (8, 24), generator=g),
        "attention_mask": torch.ones(8, 24, dtype=torch.long),
        "labels": torch.randint(0, 2, (8,), generator=g),
    }
    low, high = one_step(model, 1, batch), one_step(model, 16, batch)
    assert high.peak_bytes() > low.peak_bytes() > 0
    # not only the parameters: the activations saved for backward widen with the rank (x A^T is r wide)
    assert high.saved_peak_bytes > low.saved_peak_bytes > 0
    # the fixed part is the base weights plus 4 copies (weight, grad, two AdamW moments) of the trainable
    base = sum(p.numel() * p.element_size() for p in tiny_bert(vocab_size=100).parameters())
    trainable = tensor_storage_bytes(model.trainable_parameters())  # rank 16 is active
    assert high.fixed_bytes == base + 4 * trainable
    # the rank's own share, apart from the data's activations: exactly the trainable state
    assert high.state_bytes == 4 * trainable and low.state_bytes < high.state_bytes


def test_base_bytes_leave_out_every_rank_slot_and_the_trained_head_copy():
    base = tiny_bert(vocab_size=100)
    expected = sum(p.numel() * p.element_size() for p in base.parameters())
    model = LoraModel(base, LoraSettings(), torch.device("cpu"))
    model.initial_weights(2, seed=0)
    model.initial_weights(8, seed=0)  # a second slot, which a real client would not hold
    assert frozen_base_bytes(model.module) == expected


def test_saved_tensors_count_each_storage_once_and_no_parameters():
    layer = nn.Linear(6, 5)
    layer.weight.requires_grad_(False)
    meter = PeakMemoryMeter(layer, [layer.bias], "sgd")
    x = torch.randn(4, 6, requires_grad=True)
    with meter.step():
        h = layer(x)  # saves the (frozen) weight to get x's gradient: a parameter, counted elsewhere
        (h * h).sum().backward()  # saves h twice: one storage
    assert meter.saved_peak_bytes == 4 * 5 * 4
    assert meter.fixed_bytes == 6 * 5 * 4 + 2 * 5 * 4  # frozen weight, and bias + its gradient (plain SGD)


def test_training_copies_per_optimizer():
    assert training_copies("adamw") == 4
    assert training_copies("sgd", momentum=0.9) == 3
    assert training_copies("sgd") == 2
    with pytest.raises(ValueError, match="unknown optimizer"):
        training_copies("lion")
