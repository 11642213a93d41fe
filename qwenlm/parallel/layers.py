"""The collectives of a tensor-parallel Qwen model, added to its modules from outside (the network is unchanged):
a sum over ranks after each row-split linear, a vocabulary-parallel embedding, and the logits of a vocabulary-split
lm_head gathered on every rank.

Written on plain torch.distributed rather than DTensor's parallel styles: those shard nn.Linear / nn.Embedding
weights contiguously, while c_attn is split per Q, K and V block (not one contiguous run of rows) and the GPTQ
layers hold packed buffers no style knows how to cut. Keeping every rank's slice a plain tensor in the same module
lets the loader read just that slice from the files, and the same kernels (GPTQ Triton GEMVs, the fused gate_up)
run unchanged on each rank. dynamo traces `dist.all_reduce` as a functional collective, so a compiled step keeps
its collectives in the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce_output(module: nn.Module, group=None) -> None:
    """After `module` (a row-split linear: each rank holds some input features), sum its output over the ranks."""

    def hook(_module, _inputs, out):
        dist.all_reduce(out, group=group)
        return out

    module.register_forward_hook(hook)


def gather_output(module: nn.Module, group=None) -> None:
    """After `module` (a linear holding a contiguous, equal share of the output features on each rank), every rank
    gets the whole output: the vocabulary-split lm_head's logits."""

    def hook(_module, _inputs, out):
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    module.register_forward_hook(hook)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the embedding: ids outside look up zeros, and the sum over ranks
    gives every rank the whole embedding. Same `weight` name as nn.Embedding, so checkpoints load by name."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, group=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [..., H]
        out = out.masked_fill(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out
