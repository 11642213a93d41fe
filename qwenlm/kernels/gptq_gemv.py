"""Batch-1 (M == 1) GPTQ GEMVs: the Triton kernels that stream the official packed tensors at decode time,
and their launch table (H100 measurements, docs/performance-notes.md).

- `_gemv_kernel` (M == 1): loads each packed word once, unpacks its lanes one at a time with plain FMAs
  into a per-row accumulator reduced once at the end; split-K over the grid keeps every SM busy. Each Int4
  lane becomes a float by an exponent trick instead of a conversion instruction.
- `_gemv_kernel_v2` (M == 1, shapes where it measured faster): the same grid and in-kernel split-K reduction,
  with cheaper unpacking -- UNPACK 1 leaves each lane in place in a float's mantissa (one LOP3 + FADD per
  weight, no shift), UNPACK 2 (Int4, the fallback of v4's table entries for groups v4 cannot take) uses half2
  math as Marlin/exllama do (`_int4_word_dot`, ~2.4 instructions per weight instead of ~7; products summed in
  fp16 over the 8 lanes of a word, then fp32).
- `qwenlm.kernels.gptq_int4._gemv_kernel_v4` (Int4, M == 1; the table's choice at every Qwen-7B shape): every
  row of a group inside the thread, summed in half2 in registers.
The split-K epilogue they share is `qwenlm.kernels.sync._store_output`.
The GEMVs use  sum_k x_k * s * (q_kn - z_n) = s * (sum_k x_k q_kn - z_n * sum_k x_k)  per group (or subtract z
per weight in half2), so the scale is applied once per block instead of once per weight.
Measured (H100, docs/performance-notes.md run 5): back to back in a CUDA graph the v4 GEMVs take ~5 us plus ~0.39
us/MB (2.6 TB/s) -- the fixed part (launch gap, first loads, the split-K epilogue's atomics) is now most of
what separates them from the bandwidth bound at these sizes (8-45 MB).

`qwenlm.kernels.gptq_matmul.gptq_matmul` is the entry point (it calls `gemv` for one row).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dequantize path in qwenlm.model.quant is used instead
    triton = None


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter cannot run inline PTX

if triton is not None:
    from qwenlm.kernels.gptq_int4 import _gemv_kernel_v4
    from qwenlm.kernels.sync import _store_output

    @triton.jit
    def _int4_word_dot(qw, x04, x15, x26, x37, zz, ASM: tl.constexpr):
        """fp32 sum over the 8 lanes of each Int4 word: sum_l x_l * (q_l - z). x.. / zz: int32 holding two fp16
        halves (x of lanes (i, i+4); 1024 + z twice). Marlin's trick with half2 math: (w >> 4i) & 0x000F000F |
        0x64006400 is the half2 (1024 + q_i, 1024 + q_{i+4}); subtracting 1024 + z leaves q - z exactly; four
        half2 FMAs sum the products in fp16 (8 terms each, then fp32) -- ~2.4 instructions per weight instead of
        ~7 in fp32. ASM False (the Triton interpreter, which cannot run PTX): the same math in fp32 from the same
        packed operands."""
        if ASM:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 a0, a1, a2, a3, t, p;
                .reg .f16 lo, hi;
                .reg .f32 f0, f1;
                lop3.b32 a0, $1, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 t, $1, 4;
                lop3.b32 a1, t, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 t, $1, 8;
                lop3.b32 a2, t, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 t, $1, 12;
                lop3.b32 a3, t, 0x000F000F, 0x64006400, 0xEA;
                sub.f16x2 a0, a0, $6;
                sub.f16x2 a1, a1, $6;
                sub.f16x2 a2, a2, $6;
                sub.f16x2 a3, a3, $6;
                mul.rn.f16x2 p, a0, $2;
                fma.rn.f16x2 p, a1, $3, p;
                fma.rn.f16x2 p, a2, $4, p;
                fma.rn.f16x2 p, a3, $5, p;
                mov.b32 {lo, hi}, p;
                cvt.f32.f16 f0, lo;
                cvt.f32.f16 f1, hi;
                add.f32 $0, f0, f1;
                }""",
                constraints="=f,r,r,r,r,r,r",
                args=[qw, x04, x15, x26, x37, zz], dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = ((zz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1024.0)
            total = tl.zeros(qw.shape, dtype=tl.float32)
            for i in tl.static_range(4):
                xp = x04 if i == 0 else (x15 if i == 1 else (x26 if i == 2 else x37))
                x_lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                total += x_lo * (((qw >> (4 * i)) & 15).to(tl.float32) - z)
                total += x_hi * (((qw >> (4 * i + 16)) & 15).to(tl.float32) - z)
            return total

    @triton.jit
    def _half_bits(x):
        """fp16 [R] -> int32 [R] holding its 16 bits in the low half."""
        return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _x_pair(xb, i: tl.constexpr, mask):
        """int32 [R] holding the fp16 pair (x[8r + i], x[8r + i + 4]): the inputs of lanes i and i + 4."""
        lo = _half_bits(tl.load(xb + i, mask=mask, other=0.0))
        return lo | (_half_bits(tl.load(xb + i + 4, mask=mask, other=0.0)) << 16)

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
        _store_output(tl.sum(acc, axis=0), b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k,
                      HAS_BIAS, SPLIT_K, FUSED_REDUCE, BLOCK_N)

    @triton.jit
    def _load_block(qw_ptr, s_ptr, qz_ptr, kb, rows, offs_n, n_mask, N, K, group_size, PER: tl.constexpr):
        """The packed words [ROWS, BLOCK_N], scales and packed zeros [BLOCK_N] of the K block at kb (masked
        off past K)."""
        r = kb // PER + rows
        qw = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=(r < K // PER)[:, None] & n_mask[None, :],
                     other=0)
        g = kb // group_size
        m = n_mask & ((offs_n * 0 + kb) < K)  # a whole tensor: the interpreter refuses a scalar mask here
        s = tl.load(s_ptr + g * N + offs_n, mask=m, other=0.0)
        zw = tl.load(qz_ptr + g * (N // PER) + offs_n // PER, mask=m, other=0)
        return qw, s, zw

    @triton.jit
    def _gemv_kernel_v2(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, group_size,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                     UNPACK: tl.constexpr, ASM: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        ROWS: tl.constexpr = BLOCK_K // PER
        LOW: tl.constexpr = 5 if BITS == 4 else 2  # UNPACK 1: lanes whose bits sit below bit 20 (Int4) / 16 (Int8)
        HI_SHIFT: tl.constexpr = 12 if BITS == 4 else 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.arange(0, ROWS)
        z_shift = (offs_n % PER) * BITS
        # Partial sums stay per packed row until the end: no cross-thread reduction inside the loop.
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        STEP: tl.constexpr = BLOCK_K * SPLIT_K
        for kb in range(pid_k * BLOCK_K, K, STEP):
            r = kb // PER + rows  # packed rows of this block
            r_mask = r < K // PER
            qw, s, zw = _load_block(qw_ptr, s_ptr, qz_ptr, kb, rows, offs_n, n_mask,
                                    N, K, group_size, PER)  # [ROWS, BLOCK_N], each word read once
            s = s.to(tl.float32)
            z = (zw >> z_shift) & MASK
            if UNPACK == 2:  # Int4, half2 math (_int4_word_dot)
                xb = x_ptr + kb + rows * 8
                x04 = _x_pair(xb, 0, r_mask)
                x15 = _x_pair(xb, 1, r_mask)
                x26 = _x_pair(xb, 2, r_mask)
                x37 = _x_pair(xb, 3, r_mask)
                zz = (z + 1) | 0x6400
                zz = zz | (zz << 16)
                dot = _int4_word_dot(qw, x04[:, None], x15[:, None], x26[:, None], x37[:, None], zz[None, :], ASM)
                acc += s[None, :] * dot
            else:  # UNPACK 1
                # The upper lanes moved into the low 20 (Int4) / 16 (Int8) bits by one shift per word.
                hi = qw >> HI_SHIFT
                part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                xs = tl.zeros((ROWS,), dtype=tl.float32)
                for j in tl.static_range(PER):  # lane j of every word: input kb + row*PER + j
                    xj = tl.load(x_ptr + kb + rows * PER + j, mask=r_mask, other=0.0).to(tl.float32)
                    # Lane left in place at bit p of the mantissa: (word & (MASK << p)) | 0x4B000000 is the float
                    # 2^23 + q * 2^p exactly (p + BITS <= 23), so one LOP3 + one FADD give q * 2^p, and the
                    # 2^-p goes into x (per row, not per weight). No per-lane shift.
                    if j < LOW:
                        wq = ((qw & (MASK << (j * BITS))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                        part += (xj * (1.0 / (1 << (j * BITS))))[:, None] * wq
                    else:
                        lo = j * BITS - HI_SHIFT
                        wq = ((hi & (MASK << lo)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                        part += (xj * (1.0 / (1 << lo)))[:, None] * wq
                    xs += xj
                acc += s[None, :] * (part - xs[:, None] * (z + 1).to(tl.float32)[None, :])
        _store_output(tl.sum(acc, axis=0), b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k,
                      HAS_BIAS, SPLIT_K, FUSED_REDUCE, BLOCK_N)


# Launch settings per (bits, N, K) for batch 1, from GEMV sweeps on an H100 (2026-11-22; docs/performance-notes.md):
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages[, KERNEL]). KERNEL 0 = `_gemv_kernel`; 1 / 2 =
# `_gemv_kernel_v2` with mantissa / half2 unpacking; 4 = `_gemv_kernel_v4` (Int4; BLOCK_K inputs per iteration,
# at most a group; BLOCK_N = 128 x warps). Int4 uses v4 at every Qwen-7B shape (run 5, back to back in a CUDA
# graph: 10-27% faster than the previous table, c_proj even); Int8 keeps its own.
GEMV_CONFIGS: dict[tuple[int, int, int], tuple] = {  # (bits, N, K)
    (4, 12288, 4096): (512, 128, 16, 4, 2, 4),
    (4, 4096, 4096): (256, 128, 16, 2, 3, 4),
    (4, 11008, 4096): (512, 128, 16, 4, 2, 4),
    (4, 22016, 4096): (512, 128, 8, 4, 2, 4),  # w1 + w2 concatenated (`quant.concat_gptq_linears`)
    (4, 4096, 11008): (256, 128, 16, 2, 3, 4),
    (8, 12288, 4096): (64, 128, 4, 4, 3),
    (8, 4096, 4096): (256, 64, 32, 2, 3),
    (8, 11008, 4096): (64, 128, 8, 4, 3),
    (8, 22016, 4096): (128, 128, 4, 4, 3, 1),
    (8, 4096, 11008): (64, 128, 32, 4, 3),
}
SWEPT_CONFIGS = dict(GEMV_CONFIGS)  # the measured entries, which `gemv_config` scales to other shapes


def gemv_config(bits: int, n: int, k: int) -> tuple:
    """The table's launch for (bits, N, K), else `scaled_config`'s; always six fields (KERNEL last)."""
    cfg = tuple(GEMV_CONFIGS.get((bits, n, k)) or scaled_config(bits, n, k))
    return cfg + (0,) if len(cfg) == 5 else cfg


def scaled_config(bits: int, n: int, k: int) -> tuple:
    """A shape the sweeps did not cover (Qwen-1.8B / 14B / 72B, tensor-parallel slices of any size): the launch of
    the nearest swept shape of the same bits (distance in log N + log K), its kernel, tiles, warps and stages, with
    SPLIT_K rescaled so the launch has about as many programs as the swept one (the GPU as full), and no more
    splits than K tiles. Int4 thus stays on the v4 kernel at every Qwen size, Int8 on its layer's kernel."""
    near = min((key for key in SWEPT_CONFIGS if key[0] == bits),
               key=lambda key: (abs(math.log(key[1] / n)) + abs(math.log(key[2] / k)), key))
    cfg = SWEPT_CONFIGS[near]
    block_n, block_k, split_k = cfg[:3]
    programs = -(-near[1] // block_n) * split_k
    split_k = max(1, min(round(programs / -(-n // block_n)), -(-k // block_k)))
    return (block_n, block_k, split_k) + tuple(cfg[3:])


def gemv_workspace(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 [N] partial sums and int32 arrival counters (one per column block of >= 16) for the
    fused split-K reduction; one per layer, since the kernel leaves it zeroed but owns it while it runs."""
    return (torch.zeros(n, device=device, dtype=torch.float32),
            torch.zeros(triton.cdiv(n, 16) if triton is not None else 0, device=device, dtype=torch.int32))


def gemv(x: torch.Tensor, qweight, qzeros, scales, group_size: int, bits: int, bias=None,
         config: tuple | None = None, workspace: tuple | None = None) -> torch.Tensor:
    """x [1, K] -> [1, N] in x's dtype (see `gptq_matmul`, which checks the arguments)."""
    K = x.shape[1]
    N = qweight.shape[1]
    has_bias = bias is not None
    b = bias if has_bias else scales  # any valid pointer; unused when HAS_BIAS is False
    cfg = tuple(config) if config is not None else gemv_config(bits, N, K)
    block_n, block_k, split_k, warps, stages = cfg[:5]
    unpack = cfg[5] if len(cfg) > 5 else 0
    if unpack == 4 and (bits != 4 or K % group_size or group_size & (group_size - 1)
                        or group_size > 256):
        # v4 reads the official layout of whole power-of-two groups of at most 256 (a group's rows sit in
        # one thread's registers); the other kernels do the rest
        unpack = 2 if bits == 4 else 0
    assert unpack in (0, 1, 2, 4) and (unpack != 2 or bits == 4), f"GEMV config {cfg}: KERNEL 0, 1, 2 (Int4) or 4"
    if unpack == 4:
        block_k = 1 << (max(8, min(block_k, group_size)).bit_length() - 1)  # a power of two: divides the group
        split_k = max(1, min(split_k, K // block_k))
    else:
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
    if unpack == 4:
        x16 = x if x.dtype == torch.float16 else x.half()  # v4 reads the inputs as fp16 pairs
        _gemv_kernel_v4[grid](x16, qweight, qzeros, scales, b, out, ws, cnt, N, K, GROUP=group_size,
                              HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                              FUSED_REDUCE=fused, ASM=not INTERPRET, STAGES=stages, num_warps=warps,
                              num_stages=stages)
    elif unpack == 0:
        _gemv_kernel[grid](x, qweight, qzeros, scales, b, out, ws, cnt, N, K, group_size, BITS=bits,
                           HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                           FUSED_REDUCE=fused, num_warps=warps, num_stages=stages)
    else:
        _gemv_kernel_v2[grid](x, qweight, qzeros, scales, b, out, ws, cnt, N, K, group_size, BITS=bits,
                              HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                              FUSED_REDUCE=fused, UNPACK=unpack, ASM=not INTERPRET, num_warps=warps,
                              num_stages=stages)
    return out if (split_k == 1 or fused) else out.to(x.dtype)
