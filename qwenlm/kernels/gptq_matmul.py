"""Triton W4A16 / W8A16 matmul that reads the official GPTQ ("cuda-old") tensors as they are stored.

Layout (spec §10.4): qweight int32 [K*b/32, N] packed along the input dim (lane j of row r is input
r*(32/b)+j at bit offset b*j), qzeros int32 [G, N*b/32] packed along the output dim holding zero-1,
scales [G, N]. Groups must be contiguous runs of `group_size` inputs (g_idx = k // group_size); an
act-order checkpoint is brought to that form at load time by permuting its rows (`quant.finalize`).

Two kernels, because batch-1 decode and batched/prefill rows want different work:
- `_gemv_kernel` (M == 1): loads each packed word once, unpacks its lanes one at a time with plain FMAs
  into a per-row accumulator reduced once at the end; split-K over the grid keeps every SM busy. At batch 1
  the unpacking, not the memory, limits an H100 (~5 integer/float instructions per 4-bit weight, 2 weights
  per byte), so each lane becomes a float by an exponent trick instead of a conversion instruction.
- M > 1 (batched decode, prefill): `_dequant_kernel` writes the fp16/bf16 weight once, cuBLAS multiplies.
The GEMV uses  sum_k x_k * s * (q_kn - z_n) = s * (sum_k x_k q_kn - z_n * sum_k x_k)  per group, so the scale
and zero are applied once per block instead of once per weight.

`gptq_matmul_reference` is the plain-torch definition the kernels are tested against.
"""

from __future__ import annotations

import torch

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
    def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, group_size,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        ROWS: tl.constexpr = BLOCK_K // PER
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.arange(0, ROWS)
        z_shift = (offs_n % PER) * BITS
        # Partial sums stay per packed row until the end: no cross-thread reduction inside the loop.
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for kb in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            r = kb // PER + rows  # packed rows of this block
            r_mask = r < K // PER
            qw = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                         other=0)  # [ROWS, BLOCK_N], each word read once
            part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((ROWS,), dtype=tl.float32)
            for j in tl.static_range(PER):  # lane j of every word: input kb + row*PER + j
                xj = tl.load(x_ptr + kb + rows * PER + j, mask=r_mask, other=0.0).to(tl.float32)
                if BITS == 4:
                    # int -> float without a conversion instruction (those issue at 1/8 the FMA rate on sm_90):
                    # 0x4B000000 | q is the float 2^23 + q, exactly. (Int8 keeps the conversion: sm_90 converts a
                    # selected byte in one instruction, which measured faster than this.)
                    wq = (((qw >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                else:
                    wq = ((qw >> (j * BITS)) & MASK).to(tl.float32)
                part += xj[:, None] * wq
                xs += xj
            g = kb // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = (tl.load(qz_ptr + g * (N // PER) + offs_n // PER, mask=n_mask, other=0) >> z_shift) & MASK
            acc += s[None, :] * (part - xs[:, None] * (z + 1).to(tl.float32)[None, :])
        out = tl.sum(acc, axis=0)  # [BLOCK_N]
        if HAS_BIAS:
            if pid_k == 0:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)
        elif FUSED_REDUCE:
            # Split-K without the zero-fill and cast kernels: partial sums go to a float32 workspace kept at
            # zero between calls; the last program of each column block (counted by an atomic) writes the
            # output and re-arms the workspace and its counter. Saves two launches per linear.
            tl.atomic_add(ws_ptr + offs_n, out, mask=n_mask)
            tl.debug_barrier()  # every thread's partial sums are issued before the count is released
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel, gpu scope
            if arrived == SPLIT_K - 1:
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                total = tl.atomic_add(ws_ptr + offs_n, zero, mask=n_mask)  # read where the atomics landed (L2)
                tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.store(ws_ptr + offs_n, zero, mask=n_mask)  # every partial has arrived: plain stores re-arm
                tl.store(cnt_ptr + pid_n, 0)
        else:
            tl.atomic_add(out_ptr + offs_n, out, mask=n_mask)

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


# Launch settings per (bits, N, K) for batch 1, chosen by bench/bench_quant.py --sweep on an H100
# (Int4: the 2026-11-22 sweep with the in-kernel split-K reduction; Int8: the earlier, wider sweep).
GEMV_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int, int, int]] = {  # (bits, N, K)
    (4, 12288, 4096): (256, 128, 8, 4, 3),
    (8, 12288, 4096): (64, 128, 4, 4, 3),
    (4, 4096, 4096): (64, 128, 16, 4, 3),
    (8, 4096, 4096): (256, 64, 32, 2, 3),
    (4, 11008, 4096): (64, 128, 8, 4, 3),
    (8, 11008, 4096): (64, 128, 8, 4, 3),
    (4, 4096, 11008): (64, 128, 16, 4, 3),
    (8, 4096, 11008): (64, 128, 32, 4, 3),
}
GEMV_DEFAULT = (128, 128, 8, 4, 3)  # BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages


def gemv_config(bits: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    return GEMV_CONFIGS.get((bits, n, k), GEMV_DEFAULT)


def gemv_workspace(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 [N] partial sums and int32 arrival counters (one per column block of >= 16) for the
    fused split-K reduction; one per layer, since the kernel leaves it zeroed but owns it while it runs."""
    return (torch.zeros(n, device=device, dtype=torch.float32),
            torch.zeros(triton.cdiv(n, 16) if triton is not None else 0, device=device, dtype=torch.int32))


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, group_size: int, bits: int, bias=None,
                config: tuple | None = None, workspace: tuple | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32, contiguous) -> [M, N] in x's dtype. Groups contiguous (g_idx = k // g).

    workspace (`gemv_workspace(N)`): batch-1 split-K reduces inside the GEMV kernel (one launch, not three)."""
    if triton is None:
        raise RuntimeError("gptq_matmul needs triton; use qwenlm.model.quant's dequantize path instead")
    M, K = x.shape
    N = qweight.shape[1]
    if group_size % 32:
        raise ValueError(f"GPTQ group_size {group_size} must be a multiple of 32 for the Triton kernel")
    has_bias = bias is not None
    b = bias if has_bias else scales  # any valid pointer; unused when HAS_BIAS is False
    if M == 1:
        block_n, block_k, split_k, warps, stages = config or gemv_config(bits, N, K)
        block_k = min(block_k, group_size)
        while group_size % block_k:
            block_k //= 2
        grid = (triton.cdiv(N, block_n), split_k)
        fused = split_k > 1 and workspace is not None and block_n >= 16
        if split_k == 1 or fused:
            out = torch.empty((1, N), device=x.device, dtype=x.dtype)
        else:
            out = torch.zeros((1, N), device=x.device, dtype=torch.float32)
        ws, cnt = workspace if fused else (out, out)
        _gemv_kernel[grid](x, qweight, qzeros, scales, b, out, ws, cnt, N, K, group_size, BITS=bits,
                           HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                           FUSED_REDUCE=fused, num_warps=warps, num_stages=stages)
        return out if (split_k == 1 or fused) else out.to(x.dtype)
    # Several rows: dequantize once, then cuBLAS. On the H100 a fused tl.dot kernel measured 2-4x an fp16
    # matmul at 4 and 16 rows; this path costs 1.15-1.3x at 2048 rows (docs/benchmarks.md).
    w = torch.empty((K, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(K // (32 // bits), 16), triton.cdiv(N, 128))
    _dequant_kernel[grid](qweight, qzeros, scales, w, N, K, group_size, BITS=bits, BLOCK_R=16, BLOCK_N=128)
    return torch.addmm(bias, x, w) if has_bias else x @ w
