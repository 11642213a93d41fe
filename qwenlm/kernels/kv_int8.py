"""Int8 KV cache rows (spec §8, `qwenlm.model.quant.quantize_kv` math): quantize new K/V rows into the uint8
pools with a float32 (scale, zero) per token and head, and read them back.

Pools: [num_blocks, block_size, heads, head_dim] uint8, (scale, zero) in [num_blocks, block_size, heads, 2]
float32; `x ~ scale * (q - zero)`. `quantize_store_kv` is one Triton program per token on CUDA (the plain-torch
`quantize_store_kv_ref` elsewhere); it can also hand back the rows as stored, dequantized, so a prefill
attends to exactly what later steps will read from the pool without reading it back.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch path
    triton = None


def dequantize_rows(q_u8: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., d] and (scale, zero) [..., 2] -> scale * (q - zero) in dtype (the official dequantize)."""
    from qwenlm.model.quant import dequantize_kv
    return dequantize_kv(q_u8, scale_zero[..., 0:1], scale_zero[..., 1:2], dtype)


def quantize_store_kv_ref(k, v, k_cache, v_cache, k_sz, v_sz, slot_mapping, dequantized: bool = False):
    """Quantize k, v [..., h, d] per token and head (quant.quantize_kv) into uint8 pools [N, bs, h, d] at the
    given slots, with (scale, zero) into k_sz / v_sz [N, bs, h, 2]. dequantized=True: also return the rows as
    stored, dequantized to k's dtype ([n, h, d] each), i.e. what reading them back from the pool gives."""
    from qwenlm.model.quant import dequantize_kv, quantize_kv
    H, D = k_cache.shape[-2:]
    rows = []
    for x, cache, sz in ((k, k_cache, k_sz), (v, v_cache, v_sz)):
        q8, scale, zero = quantize_kv(x.reshape(-1, H, D))
        cache.view(-1, H, D).index_copy_(0, slot_mapping, q8)
        sz.view(-1, H, 2).index_copy_(0, slot_mapping, torch.cat((scale, zero), -1))
        rows.append(dequantize_kv(q8, scale, zero, x.dtype) if dequantized else None)
    return tuple(rows) if dequantized else None


if triton is not None:

    @triton.jit
    def _quantize_rows(x):
        """x [R, d] fp32 -> (uint8 [R, d], scale [R], zero [R]): quant.quantize_kv's math, with IEEE divisions
        (div_rn) as torch computes them and float -> uint8 truncation toward zero."""
        fmax = tl.max(x, 1)
        fmin = tl.min(x, 1)
        qscale = tl.maximum(tl.math.div_rn(fmax - fmin, 255.0), 1e-8)
        zero = 0.0 - tl.math.div_rn(fmin, qscale)
        y = tl.math.div_rn(x, qscale[:, None]) + zero[:, None]
        return tl.minimum(tl.maximum(y, 0.0), 255.0).to(tl.uint8), qscale, zero

    @triton.jit
    def _quantize_store_kernel(Kin, Vin, KC, VC, KSZ, VSZ, Slots, KD, VD, H, stride_kt, stride_kh, stride_vt,
                               stride_vh, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, DEQUANT: tl.constexpr):
        """One token: quantize its K and V rows [H, d] per head (quant.quantize_kv math) into slot Slots[t];
        DEQUANT: also write the stored rows dequantized (dequantize_kv math: scale * (q - zero) in fp32, then
        cast) to KD / VD [T, H, d], contiguous."""
        t = tl.program_id(0)
        slot = tl.load(Slots + t).to(tl.int64)
        hh = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        h_ok = hh < H
        dst = slot * H * HEAD_DIM + hh[:, None] * HEAD_DIM + d[None, :]
        dst_sz = slot * H * 2 + hh * 2
        for which in tl.static_range(2):
            if which == 0:
                src = Kin + t * stride_kt + hh[:, None] * stride_kh + d[None, :]
            else:
                src = Vin + t * stride_vt + hh[:, None] * stride_vh + d[None, :]
            q8, qscale, zero = _quantize_rows(tl.load(src, mask=h_ok[:, None], other=0.0).to(tl.float32))
            if DEQUANT:
                deq = qscale[:, None] * (q8.to(tl.float32) - zero[:, None])
                row = t * H * HEAD_DIM + hh[:, None] * HEAD_DIM + d[None, :]
                if which == 0:
                    tl.store(KD + row, deq.to(KD.dtype.element_ty), mask=h_ok[:, None])
                else:
                    tl.store(VD + row, deq.to(VD.dtype.element_ty), mask=h_ok[:, None])
            if which == 0:
                tl.store(KC + dst, q8, mask=h_ok[:, None])
                tl.store(KSZ + dst_sz, qscale, mask=h_ok)
                tl.store(KSZ + dst_sz + 1, zero, mask=h_ok)
            else:
                tl.store(VC + dst, q8, mask=h_ok[:, None])
                tl.store(VSZ + dst_sz, qscale, mask=h_ok)
                tl.store(VSZ + dst_sz + 1, zero, mask=h_ok)


def quantize_store_kv(k, v, k_cache, v_cache, k_sz, v_sz, slot_mapping, use_triton: bool,
                      dequantized: bool = False):
    """quantize_store_kv_ref through one Triton launch (k, v [..., h, d], each head's d values contiguous);
    with dequantized=True it also returns the stored rows dequantized (no read-back from the pool)."""
    if not use_triton:
        return quantize_store_kv_ref(k, v, k_cache, v_cache, k_sz, v_sz, slot_mapping, dequantized)
    H, D = k_cache.shape[-2:]
    k2, v2 = k.reshape(-1, H, D), v.reshape(-1, H, D)
    assert k2.stride(-1) == 1 and v2.stride(-1) == 1 and k_cache.is_contiguous() and k_sz.is_contiguous()
    n = k2.shape[0]
    kd, vd = (torch.empty(n, H, D, dtype=k.dtype, device=k.device) for _ in range(2)) if dequantized else (k2, v2)
    if n:
        _quantize_store_kernel[(n,)](k2, v2, k_cache, v_cache, k_sz, v_sz, slot_mapping, kd, vd, H,
                                     k2.stride(0), k2.stride(1), v2.stride(0), v2.stride(1), HEAD_DIM=D,
                                     BLOCK_H=triton.next_power_of_2(H), DEQUANT=dequantized, num_warps=4)
    return (kd, vd) if dequantized else None
