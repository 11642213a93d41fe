"""Batches for training: samples packed into a token budget, or padded per batch as the fallback.

A packed batch is one row [1,T] of samples back to back with `position_ids` restarting at 0 per sample
and `cu_seqlens` [n+1] (int32) marking the boundaries; `qwenlm.model.qwen.PackedAttention` keeps attention
inside each sample. The label at each sample's first token is set to IGNORE_TOKEN_ID: with the shifted
loss it would otherwise be predicted from the previous sample's last token. Unpacked, that label is never
a target either (nothing precedes it), so packing leaves the loss and its gradients unchanged.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from qwenlm.train.data import Sample
from qwenlm.train.labels import IGNORE_TOKEN_ID


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices grouped into packs of at most `budget` tokens, best-fit in the given order.

    Each sample goes into the open pack it fills most tightly (a new one if none has room), so the input
    order (the caller's shuffle) is kept within each pack and packs come out nearly full.
    """
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, over the packing budget of {budget}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, p = free.pop(k)
        else:
            room, p = budget, len(packs)
            packs.append([])
        packs[p].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, p))
    return packs


@dataclass
class PackStats:
    packs: int
    tokens: int
    budget: int

    @property
    def fill(self) -> float:
        """Share of the packs' token budget holding real tokens."""
        return self.tokens / (self.packs * self.budget) if self.packs else 0.0


def pack_stats(samples: list[Sample], packs: list[list[int]], budget: int) -> PackStats:
    return PackStats(len(packs), sum(len(samples[i].input_ids) for p in packs for i in p), budget)


def collate_packed(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """One packed row: input_ids, labels, position_ids [1,T] (int64) and cu_seqlens [n+1] (int32)."""
    ids, labels, positions, cu = [], [], [], [0]
    for s in samples:
        n = len(s.input_ids)
        ids += s.input_ids
        labels += [IGNORE_TOKEN_ID] + s.labels[1:]  # see the module docstring
        positions += range(n)
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }


def pad_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples right-padded to the longest one of the batch (official: always to model_max_length).

    Pads are `pad_id` (finetune.py uses <|endoftext|>) with IGNORE labels; they come after each sample, so
    causal attention keeps real tokens from seeing them.
    """
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.bool)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = torch.tensor(s.input_ids)
        labels[r, :n] = torch.tensor(s.labels)
        mask[r, :n] = True
    positions = torch.arange(T).expand(len(samples), T).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
