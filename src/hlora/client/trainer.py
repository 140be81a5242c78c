"""Local training of one client's adapter: a plain PyTorch loop over the client's own rows.

The optimizer is created afresh every round (its state does not travel), and every random choice
(batch order, dropout) comes from the seed the caller passes, so a round is reproducible on its own.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import LengthGroupedSampler

from hlora.client.cost import PeakMemoryMeter
from hlora.config import TrainSettings
from hlora.data.tokenize import EncodedSplit
from hlora.models.lora_model import LoraModel
from hlora.protocol import TrainResult
from hlora.weights import AdapterWeights


def local_steps(settings: TrainSettings, num_rows: int) -> int:
    """Optimizer steps in one round: `local_steps` if set, else `local_epochs` passes over the rows."""
    if settings.local_steps > 0:
        return settings.local_steps
    return max(1, math.ceil(settings.local_epochs * math.ceil(num_rows / settings.batch_size)))


def make_optimizer(
    params: list[torch.nn.Parameter], settings: TrainSettings, head: list[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """A fresh optimizer over the parameters that train; those in `head` at `settings.head_lr` if set."""
    head_ids = {id(p) for p in head} if settings.head_lr is not None else set()
    trained = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) not in head_ids]}]
    if head_ids:
        groups.append({"params": [p for p in trained if id(p) in head_ids], "lr": settings.head_lr})
    groups = [g for g in groups if g["params"]]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def batches(
    data: EncodedSplit, batch_size: int, steps: int, seed: int, collate, by_length: bool = False
) -> DataLoader:
    """Exactly `steps` batches: seeded shuffled passes over the data, repeated as often as needed; with
    `by_length`, each pass is transformers' length-grouped order (rows of similar length together)."""
    passes = math.ceil(steps * batch_size / len(data))
    if by_length:
        lengths = data.lengths().tolist()
        order = np.concatenate(
            [
                list(LengthGroupedSampler(batch_size, lengths=lengths, generator=_generator(seed, k)))
                for k in range(passes)
            ]
        )
    else:
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(data)) for _ in range(passes)])
    chunks = [order[i * batch_size : (i + 1) * batch_size].tolist() for i in range(steps)]
    return DataLoader(data, batch_sampler=chunks, collate_fn=collate)


def _generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


class LocalTrainer:
    """Trains an adapter on one client's rows inside the process's shared `LoraModel`."""

    def __init__(self, model: LoraModel, settings: TrainSettings, collate, progress: bool = True) -> None:
        self.model = model
        self.settings = settings
        self.collate = collate
        self.progress = progress

    def train(
        self, start: AdapterWeights, data: EncodedSplit, seed: int, desc: str = "local", train_a: bool = True
    ) -> TrainResult:
        """Train from `start` on `data` (its `A` factors frozen unless `train_a`); returns the new adapter
        of the same rank."""
        if len(data) == 0:
            raise ValueError("a client with no rows cannot train")
        s = self.settings
        t0 = time.perf_counter()
        self.model.load(start, train_a=train_a)
        params = self.model.trainable_parameters()
        optimizer = make_optimizer(params, s, head=self.model.head_parameters())
        steps = local_steps(s, len(data))
        module = self.model.module
        module.train()
        device = self.model.device
        losses = torch.zeros((), device=device)
        seen = 0
        memory = PeakMemoryMeter(module, params, s.optimizer, s.momentum)
        t_steps = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout
            bar = tqdm(
                batches(data, s.batch_size, steps, seed, self.collate, by_length=s.group_by_length),
                total=steps,
                desc=desc,
                leave=False,
                disable=not self.progress,
                unit="step",
            )
            for batch in bar:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with memory.step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16"):
                        loss = module(**batch).loss
                    loss.backward()
                if s.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses += loss.detach()
                seen += batch["labels"].shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the steps' kernels are done before the clock is read
        step_s = (time.perf_counter() - t_steps) / steps
        module.eval()
        return TrainResult(
            weights=self.model.read(),
            num_samples=len(data),
            steps=steps,
            samples_seen=seen,
            mean_loss=float(losses) / steps,
            wall_s=time.perf_counter() - t0,
            step_s=step_s,
            peak_bytes=memory.peak_bytes(),
            state_bytes=memory.state_bytes,
        )
