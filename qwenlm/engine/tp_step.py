"""What rank 0 tells the other tensor-parallel ranks about a step: a small host record (sent pickled over a gloo
group) and the step's input tensors (broadcast on the device group: NCCL on GPUs, in stream order).

The record holds only sizes and flags, so it costs the same at any context length; the token ids, positions, slots
and block tables travel as one or two device tensors that rank 0 has already built for its own forward. On a GPU
that keeps rank 0's host free of device syncs: pickling a tensor through `broadcast_object_list` on the NCCL group
would copy it to the host first and wait for the step in flight, undoing the step overlap (engine.py). The decode
ids of a sequence whose last token is still being sampled are written on rank 0's device before the broadcast,
so every rank reads the sampled token without it ever reaching the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineStart:
    """Build the runner: the engine's config and context length (every rank builds the same runner)."""
    config: object  # EngineConfig
    max_model_len: int


@dataclass(frozen=True)
class PrefillStep:
    """A prefill of `num_tokens` tokens in one flat row. Its int64 input tensor holds, in order: ids, positions,
    slots and RoPE-table rows (num_tokens each), the `num_rows` hidden rows kept (the sampled rows first, then the
    prompt-logprob rows), and the context slots of each chunk that attends to cached tokens."""
    num_tokens: int
    seqs: tuple[tuple[int, int, int, bool], ...]  # per chunk: q_start, q_len, ctx_len, attends to cached slots
    num_sampled: int
    num_rows: int
    num_prompt_rows: int
    one_alpha_row: int | None  # the RoPE-table row of every token, when they share one
    use_logn: bool
    alphas: tuple[float, ...]  # the NTK alphas of the RoPE table, in row order

    def empty_inputs(self, device) -> list[torch.Tensor]:
        ctx = sum(c for _, _, c, cached in self.seqs if cached)
        return [torch.empty(4 * self.num_tokens + self.num_rows + ctx, dtype=torch.int64, device=device)]


@dataclass(frozen=True)
class DecodeStep:
    """A decode step of `batch` sequences padded to `rows` (a CUDA-graph bucket, or `batch` when `graph` is off).
    Inputs: int64 [5 * rows] (ids, positions, slots, context lengths, RoPE-table rows) and int32 block tables
    [rows, width]."""
    batch: int
    rows: int
    graph: bool
    width: int
    max_context_len: int
    use_logn: bool
    alphas: tuple[float, ...]

    def empty_inputs(self, device) -> list[torch.Tensor]:
        return [torch.empty(5 * self.rows, dtype=torch.int64, device=device),
                torch.empty(self.rows, self.width, dtype=torch.int32, device=device)]
