"""The local trainer's batch order and precision options."""

from __future__ import annotations

import numpy as np
import pytest

from hlora import simulation
from hlora.client.trainer import batches
from hlora.data.tokenize import EncodedSplit
from hlora.federation.prepared import prepare
from hlora.rundir import create_run_dir, read_metrics


def split_of_lengths(lengths: list[int]) -> EncodedSplit:
    ids = [[1] * n for n in lengths]
    return EncodedSplit({"input_ids": ids, "attention_mask": ids}, np.zeros(len(lengths), dtype=np.int64))


def identity(rows):
    return rows


@pytest.mark.parametrize("by_length", [False, True])
def test_every_pass_visits_every_row_once_and_is_seeded(by_length):
    data = split_of_lengths(list(np.random.default_rng(0).integers(5, 100, size=203)))
    steps = 3 * 203 // 8  # three passes, the last one partial
    order = [r for b in batches(data, 8, steps, seed=4, collate=identity, by_length=by_length) for r in b]
    again = [r for b in batches(data, 8, steps, seed=4, collate=identity, by_length=by_length) for r in b]
    assert len(order) == steps * 8 and order == again
    rows = [r["input_ids"] for r in order]
    lengths_seen = sorted(len(x) for x in rows[:203])
    assert lengths_seen == sorted(data.lengths().tolist())  # the first pass is a permutation


def test_length_grouping_cuts_padding():
    data = split_of_lengths(list(np.random.default_rng(1).integers(5, 100, size=800)))

    def padded(by_length: bool) -> int:
        loader = batches(data, 8, 100, seed=0, collate=identity, by_length=by_length)
        return sum(8 * max(len(r["input_ids"]) for r in b) for b in loader)

    assert padded(True) < 0.8 * padded(False)


def test_bf16_and_grouped_batches_run_end_to_end(tiny_settings, tmp_path):
    raw = tiny_settings.model_copy(deep=True)
    raw.train.precision = "bf16"
    raw.train.group_by_length = True
    exp = prepare(raw)
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert rows and all(np.isfinite(r["train_loss"]) for r in rows)


def test_head_lr_puts_the_head_in_its_own_group():
    import torch

    from hlora.client.trainer import make_optimizer
    from hlora.config import TrainSettings

    lora, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def groups(settings):
        opt = make_optimizer([lora, head, frozen], settings, head=[head])
        return [(g["lr"], [p.numel() for p in g["params"]]) for g in opt.param_groups]

    assert groups(TrainSettings(lr=1e-3, head_lr=1e-4)) == [(1e-3, [2]), (1e-4, [3])]
    assert groups(TrainSettings(lr=1e-3)) == [(1e-3, [2, 3])]
