"""The adapter state that travels between server and clients, as plain tensors.

PEFT names its tensors after the adapter slot they live in (`...query.lora_A.r8.weight`); this module
names them after the adapted weight alone (`bert.encoder.layer.0.attention.self.query`), so that
adapters of different ranks, the aggregation math and the wire format all speak the same language.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight's LoRA factors; the update they make is `scale * B @ A`.

    Shapes: `B` is `m x r` (out x rank), `A` is `r x n` (rank x in).
    """

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoRA factors do not fit: B is {tuple(self.B.shape)}, A is {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def truncate(self, rank: int) -> LoraFactors:
        """The first `rank` components: for a balanced SVD-ordered adapter, its best rank-`rank` cut."""
        return LoraFactors(self.B[:, :rank], self.A[:rank])


@dataclass(frozen=True)
class AdapterWeights:
    """A whole adapter: LoRA factors per adapted weight, plus the other trained tensors.

    `factors` maps an adapted module's path (e.g. `bert.encoder.layer.0.attention.self.query`) to its
    factors; `dense` maps a parameter path (e.g. `classifier.weight`) to a tensor that every method
    averages as it is (the classification head, PEFT's `modules_to_save`).
    """

    factors: Mapping[str, LoraFactors]
    dense: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The adapter's rank (all its factors share one rank)."""
        ranks = {f.rank for f in self.factors.values()}
        if len(ranks) != 1:
            raise ValueError(f"adapter factors have mixed ranks {sorted(ranks)}")
        return ranks.pop()

    def truncate(self, rank: int) -> AdapterWeights:
        """The adapter cut to its first `rank` components (what a client of that rank holds)."""
        return AdapterWeights(
            {name: f.truncate(rank) for name, f in self.factors.items()}, dict(self.dense)
        )

    def tensors(self) -> dict[str, Tensor]:
        """A flat name -> tensor view, the form in which the adapter is serialised and sent."""
        flat: dict[str, Tensor] = {}
        for name, f in self.factors.items():
            flat[f"{name}.lora_A"] = f.A
            flat[f"{name}.lora_B"] = f.B
        flat.update(self.dense)
        return flat

    @classmethod
    def from_tensors(cls, flat: Mapping[str, Tensor]) -> AdapterWeights:
        """Inverse of `tensors()`."""
        a_parts = {k.removesuffix(".lora_A"): v for k, v in flat.items() if k.endswith(".lora_A")}
        b_parts = {k.removesuffix(".lora_B"): v for k, v in flat.items() if k.endswith(".lora_B")}
        if a_parts.keys() != b_parts.keys():
            raise ValueError(
                f"unpaired LoRA factors: {sorted(a_parts.keys() ^ b_parts.keys())}"
            )
        dense = {k: v for k, v in flat.items() if not k.endswith((".lora_A", ".lora_B"))}
        return cls({k: LoraFactors(b_parts[k], a_parts[k]) for k in a_parts}, dense)

    def num_bytes(self) -> int:
        """Bytes of tensor data this adapter puts on the wire."""
        return tensor_bytes(self.tensors().values())

    def clone(self) -> AdapterWeights:
        return AdapterWeights.from_tensors({k: v.detach().clone() for k, v in self.tensors().items()})


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of raw tensor data (what serialisation must carry, before any framing)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def weighted_mean(tensors: Iterable[Tensor], weights: Iterable[float]) -> Tensor:
    """`sum_k w_k T_k` for tensors of one shape; the weights are used as given."""
    pairs = list(zip(tensors, weights, strict=True))
    if not pairs:
        raise ValueError("weighted_mean of no tensors")
    out = torch.zeros_like(pairs[0][0], dtype=torch.float32)
    for t, w in pairs:
        out += float(w) * t.float()
    return out.to(pairs[0][0].dtype)
