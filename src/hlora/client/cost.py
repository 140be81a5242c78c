"""What local training costs a client: peak memory, measured per rank tier (METHOD.md "What is measured").

On CUDA the allocator's own peak is read (`torch.cuda.max_memory_allocated`), which includes the shared
base weights and every transient buffer. On the CPU torch keeps no allocator statistics, so the meter
counts what a client of a given rank must hold at the peak of a step, from the tensors themselves:

- the frozen base weights (every parameter that does not train and is neither a LoRA factor nor PEFT's
  copy of a `modules_to_save` module; the other rank slots that the in-process simulation keeps are not
  counted, a real client holds only its own);
- the trainable parameters times the copies training keeps of them: the weights and their gradients,
  plus AdamW's two moments (x4), SGD's momentum buffer (x3) or nothing more (x2);
- the tensors autograd saves for backward during one step, summed over their distinct storages (a
  storage saved twice counts once; storages of parameters are left out, they are counted above), at
  the end of the forward pass where all of them are alive; the peak over the round's steps is kept.

Left out on the CPU: transient buffers inside an operation, the activation gradients of the backward
pass, buffers (position ids), the data batch. It is the part of the memory that differs by rank,
counted exactly, on top of what every tier shares, so the figures are comparable between tiers, not a
process's resident size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def tensor_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        ptr, nbytes = _storage(t)
        seen[ptr] = nbytes
    return sum(seen.values())


def frozen_base_bytes(module: nn.Module) -> int:
    """Bytes of the frozen base weights under a PEFT model: every parameter that does not train, less
    the LoRA factors of any slot and PEFT's `modules_to_save` copies (the original head is a base
    weight)."""
    return tensor_storage_bytes(
        p
        for name, p in module.named_parameters()
        if not p.requires_grad and "lora_" not in name and ".modules_to_save." not in name
    )


def training_copies(optimizer: str, momentum: float = 0.0) -> int:
    """Tensors of a trainable parameter's size that training holds: weight, gradient, optimizer state."""
    if optimizer == "adamw":
        return 4  # weight, gradient, exp_avg, exp_avg_sq
    if optimizer == "sgd":
        return 3 if momentum > 0 else 2  # weight, gradient (, momentum buffer)
    raise ValueError(f"unknown optimizer {optimizer!r}")


class PeakMemoryMeter:
    """Peak memory of one client's local training (see the module's docstring for what it counts).

    Wrap each step's forward and backward in `step()`; read `peak_bytes()` after the last step. On
    CUDA the meter resets the device's peak statistics when it is created and reads them at the end.
    """

    def __init__(
        self, module: nn.Module, trainable: Iterable[nn.Parameter], optimizer: str, momentum: float = 0.0
    ) -> None:
        trainable = [p for p in trainable if p.requires_grad]
        self.device = trainable[0].device if trainable else torch.device("cpu")
        # What training holds per trainable tensor (weights, gradients, optimizer state): the part of the
        # memory that grows with the rank, on any device, apart from activations that vary with the data.
        self.state_bytes = training_copies(optimizer, momentum) * tensor_storage_bytes(trainable)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        params = list(module.parameters())
        self._param_ptrs = frozenset(_storage(p)[0] for p in params)
        self.fixed_bytes = frozen_base_bytes(module) + self.state_bytes
        self.saved_peak_bytes = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Count the tensors autograd saves for backward inside this block (CPU; a no-op on CUDA)."""
        if self.on_cuda:
            yield
            return
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = _storage(t)
            if ptr not in self._param_ptrs:
                saved[ptr] = nbytes
            # Detached, so that a saved output does not hold its own graph in a reference cycle when the
            # step never reaches backward; autograd re-attaches what it needs on unpack.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        self.saved_peak_bytes = max(self.saved_peak_bytes, sum(saved.values()))

    def peak_bytes(self) -> int:
        if self.on_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.fixed_bytes + self.saved_peak_bytes


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(an id of `t`'s storage, its bytes); tensors without a plain storage count their own elements."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()
