"""What rank 0 tells the other tensor-parallel ranks about a step: a small host record (sent pickled over a gloo
group, `RecordChannel`) and the step's input tensors (broadcast on the device group: NCCL on GPUs, in stream order).

The record holds only sizes and flags, so it costs the same at any context length; the token ids, positions, slots
and block tables travel as one or two device tensors that rank 0 has already built for its own forward. On a GPU
that keeps rank 0's host free of device syncs: pickling a tensor through `broadcast_object_list` on the NCCL group
would copy it to the host first and wait for the step in flight, undoing the step overlap (engine.py). The decode
ids of a sequence whose last token is still being sampled are written on rank 0's device before the broadcast,
so every rank reads the sampled token without it ever reaching the host.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

RECORD_BYTES = 16384  # one broadcast carries a record this size or smaller (a prefill of ~1,000 chunks fits)


class RecordChannel:
    """Step records from rank 0 to the other ranks over a gloo group: pickled into one fixed-size host buffer, so a
    step costs one broadcast. (`broadcast_object_list` sends two, the size and then the bytes: 1.4 ms against 0.5 ms
    per record for one 64-int tensor between two processes on a busy 2-core machine.) A larger record sends its
    remainder in a second broadcast."""

    def __init__(self, group):
        self.group = group
        self.buf = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
        self.view = self.buf.numpy()

    def send(self, record) -> None:
        data = pickle.dumps(record)
        head = min(len(data), RECORD_BYTES - 8)
        self.view[:8] = np.frombuffer(len(data).to_bytes(8, "little"), np.uint8)
        self.view[8:8 + head] = np.frombuffer(data, np.uint8, count=head)
        dist.broadcast(self.buf, src=0, group=self.group)
        if len(data) > head:
            dist.broadcast(torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8), src=0, group=self.group)

    def recv(self):
        dist.broadcast(self.buf, src=0, group=self.group)
        n = int.from_bytes(self.view[:8].tobytes(), "little")
        head = min(n, RECORD_BYTES - 8)
        data = self.view[8:8 + head].tobytes()
        if n > head:
            rest = torch.empty(n - head, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)  # written by rank 0 of this engine, a process this one was spawned by


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
