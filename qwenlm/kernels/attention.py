"""Paged decode attention: a Triton kernel and the plain-torch reference it is tested against.

Layout: k_cache / v_cache [num_blocks, block_size, heads, head_dim]; block_tables [B, W] int32 (block ids
of each sequence, in order); context_lens [B] int32 (tokens to attend over, the new one included);
q [B, heads, head_dim]. Each program runs an online softmax over its pages, reading each K/V row once: decode
attention is bound by memory bandwidth (Qwen v1 has no GQA: every head reads its own K/V). Three kernels, picked
per pool dtype and batch size by `decode_config` (an H100 sweep):
- v1: one program per (sequence, head), products on the CUDA cores;
- v2: one program per (sequence, head, context split); with splits > 1 the last split to finish (or a second
  kernel) combines the splits' partial softmax (flash-decoding: at batch 1 one program per head leaves most of
  the GPU idle);
- mma: v2's program (one head) with both products on tensor cores, whose operands Triton streams through
  shared memory with asynchronous copies: the fastest for bf16 pools at every batch (2.95 TB/s at 128 x 640).
Given the step's new K/V, each stores it itself (quantized for int8) and attends to it as stored, which saves
the store launches of every layer.

Int8 KV cache (spec §8; the store is in `qwenlm.kernels.kv_int8`): the pools are uint8 and every (token, head)
row has a (scale, zero) pair in a float32 tensor [num_blocks, block_size, heads, 2]; `x ~ scale * (q - zero)`.
The decode kernels dequantize while they read: q.k = scale * (q.k_u8 - zero * sum(q)), so each K row costs one
dot product plus two scalars, and V rows are weighted by p * scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch path
    triton = None

from qwenlm.kernels import sync
from qwenlm.kernels.attention_config import DecodeConfig, decode_config
from qwenlm.kernels.kv_int8 import dequantize_rows

if triton is not None:
    from qwenlm.kernels.attention_kernels import _paged_decode_kernel, _paged_decode_mma_kernel, _paged_decode_v2_kernel
    from qwenlm.kernels.attention_splits import _split_reduce_kernel


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, max_len: int | None = None,
                               k_sz=None, v_sz=None):
    """Plain-torch paged decode attention; max_len (host int) bounds the gather, else taken from context_lens.

    With k_sz / v_sz the pools are int8 (uint8 rows + (scale, zero)) and are dequantized to q's dtype first."""
    B, H, D = q.shape
    bs = k_cache.shape[1]
    if max_len is None:
        max_len = int(context_lens.max())
    max_len = max(max_len, 1)
    pos = torch.arange(max_len, device=q.device)  # [S]
    blk = block_tables[:, pos // bs].long()  # [B,S]
    slots = blk * bs + pos % bs
    k = k_cache.reshape(-1, H, D)[slots]  # [B,S,h,d]
    v = v_cache.reshape(-1, H, D)[slots]
    if k_sz is not None:
        k = dequantize_rows(k, k_sz.reshape(-1, H, 2)[slots], q.dtype)
        v = dequantize_rows(v, v_sz.reshape(-1, H, 2)[slots], q.dtype)
    valid = pos[None, :] < context_lens[:, None]  # [B,S]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :])  # [B,h,1,d]
    return out[:, :, 0, :]


class SplitPartials(NamedTuple):
    """The context splits' partial softmax states of a decode attention, not yet combined: ml [2, B * heads * splits]
    (the max and the sum of exp of each (sequence, head, split), in that order), acc [B * heads * splits * head_dim]
    (the exp-weighted value sums). An unused split holds (-inf, 0, zeros). Combined as `_combine_splits` does:
    out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max m)."""
    ml: torch.Tensor
    acc: torch.Tensor
    splits: int


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, out=None, block_n: int | None = None,
                           k_sz=None, v_sz=None, k_new=None, v_new=None, slots=None,
                           config: DecodeConfig | None = None, counters: torch.Tensor | None = None,
                           prefetch: tuple | None = None, partials: bool = False):
    """Triton paged decode attention (same contract as the reference); safe inside a CUDA graph.

    k_sz / v_sz given: int8 pools (uint8 rows, float32 (scale, zero) per token and head).
    k_new / v_new [B, h, d] with slots [B]: the step's new K/V, stored into the pool at `slots` (quantized for
    int8) and attended to as the last context position (context_lens includes it), as store-then-attend would.
    config: DecodeConfig (default: decode_config(B, int8), chosen by batch size, so a CUDA graph captured for
    one batch bucket always runs one kernel shape); block_n overrides its block_n.
    counters: int32 zeros, at least B * heads (`PagedAttention._split_counters`): with context splits, the last
    split of each (sequence, head) combines the partials, instead of a second launch. The kernel leaves them zero.
    prefetch=(tensor, nbytes): the mma kernel on sm_90+ also sends the first nbytes of tensor (a later kernel's
    weights) into L2, shared out over its programs, before they wait for the kernel before (with PDL that one is
    still running; most of the programs then read little or nothing at batch 1). 0.5% more Int4 tok/s at batch 1
    with gate_up's first 16 MiB (docs/performance-notes.md, run 15); the fused step now sends 8 (run 17).
    partials=True: where the launch is the mma kernel with context splits, it returns the splits' `SplitPartials`
    instead of combining them (for a consumer that combines them as it reads them: `gptq_fused`); else the output.
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton; use paged_decode_attention_ref")
    B, H, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    int8 = k_sz is not None
    if int8:
        assert k_sz.stride() == v_sz.stride() and k_sz.stride(-1) == 1
    cfg = config or decode_config(B, int8, k_cache.dtype, partials)
    block_n = block_n or cfg.block_n
    fused = k_new is not None
    if fused:
        assert slots is not None and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        slots = slots.contiguous()  # read as Slots + b (a no-op for the runner's slots)
    sz_strides = k_sz.stride()[:3] if int8 else (0, 0, 0)
    kszv = (k_sz, v_sz) if int8 else (k_cache, v_cache)
    extra = {} if cfg.num_stages is None else {"num_stages": cfg.num_stages}
    kn, vn = (k_new, v_new) if fused else (q, q)
    if cfg.kernel == "v1":
        _paged_decode_kernel[(B, H)](
            q, k_cache, v_cache, *kszv, kn, vn, slots if fused else context_lens, out, block_tables, context_lens,
            1.0 / math.sqrt(D), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            *sz_strides, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), out.stride(0), out.stride(1),
            block_tables.stride(0), PAGE=k_cache.shape[1], HEAD_DIM=D, BLOCK_N=block_n, KV_INT8=int8,
            FUSED_STORE=fused, num_warps=cfg.num_warps, **extra)
        return out
    assert cfg.kernel != "mma" or (block_n >= 16 and D >= 16), "mma: tiles >= 16"
    split = cfg.splits > 1
    parts = partials and split and cfg.kernel == "mma"
    if split:
        part_ml = torch.empty(2, B * H * cfg.splits, device=q.device, dtype=torch.float32)
        part_m, part_l = part_ml
        part_acc = torch.empty(B * H * cfg.splits * D, device=q.device, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = out
    fused_reduce = split and counters is not None and not parts
    if fused_reduce:
        assert counters.dtype == torch.int32 and counters.numel() >= B * H
    kernel, kw = _paged_decode_v2_kernel, {}
    if cfg.kernel == "mma":
        op_dtype = k_cache.dtype
        if int8:  # uint8 values are exact in bf16 and fp16: the query's own dtype where it is one of them
            op_dtype = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float16
        assert op_dtype in (torch.bfloat16, torch.float16), f"mma: int8, bf16 or fp16 pools, not {op_dtype}"
        kernel = _paged_decode_mma_kernel
        kw = dict(OP=tl.bfloat16 if op_dtype == torch.bfloat16 else tl.float16, Q_LO=q.dtype != op_dtype)
        pf, pf_bytes = q, 0
        if prefetch is not None and sync.pdl(q.device):  # bulk prefetch: sm_90+, not the interpreter
            pf = prefetch[0].reshape(-1).view(torch.int8)
            unit = 16 * cfg.num_warps * 32  # 16-byte pieces, one per thread
            pf_bytes = min(prefetch[1], pf.numel()) // (B * H * cfg.splits) // unit * unit
            assert pf.data_ptr() % 16 == 0
        kw.update(PF=pf, pf_bytes=pf_bytes, PREFETCH=pf_bytes > 0, PF_THREADS=cfg.num_warps * 32, PARTS=parts)
    kernel[(B, H, cfg.splits)](
        q, k_cache, v_cache, *kszv, kn, vn, slots if fused else context_lens, out, part_m, part_l, part_acc,
        counters if fused_reduce else context_lens, block_tables, context_lens, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *sz_strides,
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        PAGE=k_cache.shape[1], HEAD_DIM=D, BLOCK_N=block_n, KV_INT8=int8, FUSED_STORE=fused,
        SPLIT=split, FUSED_REDUCE=fused_reduce, MIN_CHUNK=cfg.min_chunk if fused_reduce else 0,
        BLOCK_S=triton.next_power_of_2(cfg.splits), PDL=sync.pdl(q.device), num_warps=cfg.num_warps, **kw, **extra,
        **sync.pdl_launch(q.device))
    if parts:
        return SplitPartials(part_ml, part_acc, cfg.splits)
    if split and not fused_reduce:
        _split_reduce_kernel[(B, H)](part_m, part_l, part_acc, out, out.stride(0), out.stride(1), cfg.splits,
                                     HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(cfg.splits), num_warps=4)
    return out
