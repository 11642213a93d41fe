"""Triton W4A16 / W8A16 matmul that reads the official GPTQ ("cuda-old") tensors as they are stored.

Layout (spec §10.4): qweight int32 [K*b/32, N] packed along the input dim (lane j of row r is input
r*(32/b)+j at bit offset b*j), qzeros int32 [G, N*b/32] packed along the output dim holding zero-1,
scales [G, N]. Groups must be contiguous runs of `group_size` inputs (g_idx = k // group_size); an
act-order checkpoint is brought to that form at load time by permuting its rows (`quant.finalize`).

Batch-1 decode and batched/prefill rows want different work:
- M == 1: the GEMVs of `qwenlm.kernels.gptq_gemv` (packed tensors streamed as stored, split-K, half2 unpacking);
- M > 1 (batched decode, prefill): `_dequant_kernel` writes the fp16/bf16 weight once, cuBLAS multiplies.

`gptq_matmul_reference` is the plain-torch definition the kernels are tested against.
"""

from __future__ import annotations

import torch

from qwenlm.kernels.gptq_gemv import gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dequantize path in qwenlm.model.quant is used instead
    triton = None


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, N] packed along dim 0 -> int32 [R*32/bits, N] of values in [0, 2^bits)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)  # [per]
    vals = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [R, per, N]
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [G, C] packed along dim 1 -> int32 [G, C*32/bits]."""
    return unpack_rows(packed.t(), bits).t()


def gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bits, bias=None):
    """Dequantize-then-matmul in fp32: the definition of a GPTQ linear layer. Returns x's dtype."""
    q = unpack_rows(qweight, bits).float()  # [K, N]
    z = unpack_cols(qzeros, bits).float() + 1  # [G, N], stored as zero-1
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g])  # [K, N]
    out = x.float() @ w
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


if triton is not None:

    @triton.jit
    def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, group_size, BITS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """W_T [K, N] in w's dtype from the packed tensors (prefill: then one cuBLAS matmul)."""
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (r < K // PER)[:, None] & (offs_n < N)[None, :]
        qw = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=mask, other=0)
        z_shift = ((offs_n % PER) * BITS)[None, :]
        for j in tl.static_range(PER):
            k = r * PER + j
            g = k // group_size
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            z = (tl.load(qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0)
                 >> z_shift) & MASK
            w = s * (((qw >> (j * BITS)) & MASK) - (z + 1)).to(tl.float32)
            tl.store(w_ptr + k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, group_size: int, bits: int, bias=None,
                config: tuple | None = None, workspace: tuple | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32, contiguous) -> [M, N] in x's dtype. Groups contiguous (g_idx = k // g).

    workspace (`gemv_workspace(N)`): batch-1 split-K reduces inside the GEMV kernel (one launch, not three)."""
    if triton is None:
        raise RuntimeError("gptq_matmul needs triton; use qwenlm.model.quant's dequantize path instead")
    M = x.shape[0]
    if group_size % 32:
        raise ValueError(f"GPTQ group_size {group_size} must be a multiple of 32 for the Triton kernel")
    has_bias = bias is not None
    if M == 1:
        return gemv(x, qweight, qzeros, scales, group_size, bits, bias, config, workspace)
    # Several rows: dequantize once, then cuBLAS. On the H100 a fused tl.dot kernel measured 2-4x an fp16
    # matmul at 4 and 16 rows; this path costs 1.15-1.3x at 2048 rows (docs/performance-notes.md).
    w = gptq_dequantize(qweight, qzeros, scales, group_size, bits, x.dtype)
    return torch.addmm(bias, x, w) if has_bias else x @ w


def gptq_dequantize(qweight, qzeros, scales, group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W_T [K, N] in `dtype` (computed in fp32, rounded once) from the packed tensors; groups contiguous."""
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    w = torch.empty((K, N), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(K // (32 // bits), 16), triton.cdiv(N, 128))
    _dequant_kernel[grid](qweight, qzeros, scales, w, N, K, group_size, BITS=bits, BLOCK_R=16, BLOCK_N=128)
    return w
