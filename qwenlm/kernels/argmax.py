"""Greedy decoding's argmax over the vocabulary in one launch.

`torch.argmax` of a [B, 151936] row is a global reduction that first zeroes a semaphore buffer: a memset and an
8.4 µs kernel per decode step on an H100 (`bench/bench_step.py`, between two graph replays). Here each program
reduces one chunk of a row to a single int64 (the value's order key above the index's complement), and the last
program of a row to finish, counted by an arrival count it leaves at zero for the next call (as the split-K GEMVs
do), takes the largest of the chunks'. No buffer to clear, one launch.

The result is `torch.argmax(x, dim=1)`'s: the first index of the largest value, -0.0 equal to +0.0, and a NaN
larger than everything (the first NaN wins).
"""

from __future__ import annotations

import torch

from qwenlm.kernels.gptq_int4 import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _argmax_kernel(x_ptr, part_ptr, cnt_ptr, out_ptr, V, stride, C, BLOCK: tl.constexpr, CP: tl.constexpr):
        b = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + b * stride + offs, mask=offs < V, other=0.0).to(tl.float32)
        v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0
        bits = v.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 in the floats' order
        key = tl.where(v != v, 0x7FFFFFFF, key)  # NaN above +inf
        key = tl.where(offs < V, key, -2147483648)
        best = tl.max(key, 0)
        first = tl.min(tl.where(key == best, offs, 2147483647), 0)
        # larger packed value = larger key, then smaller index
        packed = (best.to(tl.int64) << 32) | (2147483647 - first).to(tl.int64)
        tl.store(part_ptr + b * CP + c, packed)
        tl.debug_barrier()  # the chunk's result is written before its arrival is counted
        arrived = tl.atomic_add(cnt_ptr + b, 1)  # acq_rel, gpu scope
        if arrived == C - 1:  # the row's last chunk: every chunk's result is visible
            k = tl.arange(0, CP)
            parts = tl.load(part_ptr + b * CP + k, mask=k < C, other=-9223372036854775808, cache_modifier=".cg")
            top = tl.max(parts, 0)
            tl.store(out_ptr + b, 2147483647 - (top & 0xFFFFFFFF))
            tl.store(cnt_ptr + b, 0)

_WORKSPACES: dict = {}


def argmax_rows(x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """torch.argmax(x, dim=1) for a float [B, V] tensor whose rows are contiguous, as int64 [B], in one launch
    (calls on one stream; the arrival counts are per device and shape)."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.is_floating_point(), "argmax_rows: float [B, V], contiguous rows"
    B, V = x.shape
    C = triton.cdiv(V, block)
    CP = triton.next_power_of_2(C)
    key = (x.device, B, CP)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(B, CP, dtype=torch.int64, device=x.device),
                            torch.zeros(B, dtype=torch.int32, device=x.device))
    part, cnt = _WORKSPACES[key]
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    _argmax_kernel[(B, C)](x, part, cnt, out, V, x.stride(0), C, BLOCK=block, CP=CP, num_warps=4)
    return out
