"""Tokenise a split once per run; pad each batch only to its own longest row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from hlora.data.glue import TextPairs


@dataclass(frozen=True)
class EncodedSplit(Dataset):
    """Token ids of every row (unpadded) and the labels; rows are dicts that `collate` pads."""

    features: dict[str, list[list[int]]]  # e.g. input_ids, token_type_ids, attention_mask
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, list[int] | int]:
        row: dict[str, list[int] | int] = {k: v[i] for k, v in self.features.items()}
        row["labels"] = int(self.labels[i])
        return row

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.features["input_ids"]), dtype=np.int64, count=len(self))

    def subset(self, indices: Sequence[int] | np.ndarray) -> EncodedSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return EncodedSplit(
            {k: [v[i] for i in idx] for k, v in self.features.items()}, self.labels[idx].copy()
        )


def encode(pairs: TextPairs, tokenizer, max_length: int) -> EncodedSplit:
    """Tokenise every row once (truncated to `max_length`, not padded)."""
    texts = (pairs.text_a, pairs.text_b) if pairs.text_b is not None else (pairs.text_a,)
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
    features = {k: list(v) for k, v in enc.items()}
    return EncodedSplit(features, np.asarray(pairs.labels, dtype=np.int64))


def make_collator(tokenizer):
    """Dynamic padding: each batch is padded to its own longest row, by the tokenizer's own rules."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")
