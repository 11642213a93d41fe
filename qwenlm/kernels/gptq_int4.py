"""Int4 half2 arithmetic for batch-1 GPTQ GEMVs: Marlin's unpacking on the official packed tensors, the tile loads
and dot products built on it, and `_gemv_kernel_v4`, the table's Int4 GEMV (`gptq_gemv.GEMV_CONFIGS`). The fused
decode kernels (`gptq_fused`) run the same `_w_tile` / `_w_dot` on their own grid.

`_gemv_kernel_v4`: 4 columns per thread and every row of a group inside the thread, so the group's rows are summed
in half2 in registers (`_int4_word_fma`: 13 instructions per word, the zero point and a 2^-8 range guard folded
into one HFMA2 per lane pair), the scale applied once per group and no cross-thread reduction until the end.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    from qwenlm.kernels.sync import _store_output

    @triton.jit
    def _int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, h, ASM: tl.constexpr):
        """h + sum over the 8 lanes of each Int4 word of x_l * (q_l - z) / 256, h a half2 accumulator (int32
        bits; fp32 when ASM is False, for the interpreter). Marlin's unpacking: w & 0x000F000F | 0x64006400 is
        the half2 (1024 + q0, 1024 + q4) and w & 0x00F000F0 | 0x64006400 is (1024 + 16 q1, 1024 + 16 q5); one
        HFMA2 each scales by 2^-8 (2^-12) and subtracts zlo = (4 + z/256) (zhi = (1/4 + z/256)), which leaves
        (q - z)/256 exactly; w >> 8 gives lanes 2, 6, 3, 7 the same way. 13 instructions per word. The 1/256
        keeps the fp16 sums far from overflow (|terms| <= |x| * 15/256); the caller multiplies by 256 * s."""
        if ASM:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, a0, a1, a2, a3, acc, c8, c12;
                mov.b32 c8, 0x1C001C00;
                mov.b32 c12, 0x0C000C00;
                lop3.b32 a0, $1, 0x000F000F, 0x64006400, 0xEA;
                lop3.b32 a1, $1, 0x00F000F0, 0x64006400, 0xEA;
                shr.u32 t, $1, 8;
                lop3.b32 a2, t, 0x000F000F, 0x64006400, 0xEA;
                lop3.b32 a3, t, 0x00F000F0, 0x64006400, 0xEA;
                fma.rn.f16x2 a0, a0, c8, $6;
                fma.rn.f16x2 a1, a1, c12, $7;
                fma.rn.f16x2 a2, a2, c8, $6;
                fma.rn.f16x2 a3, a3, c12, $7;
                fma.rn.f16x2 acc, a0, $2, $8;
                fma.rn.f16x2 acc, a1, $3, acc;
                fma.rn.f16x2 acc, a2, $4, acc;
                fma.rn.f16x2 $0, a3, $5, acc;
                }""",
                constraints="=r,r,r,r,r,r,r,r,r",
                args=[qw, x04, x15, x26, x37, zlo, zhi, h], dtype=tl.int32, is_pure=True, pack=1)
        else:
            z = -256.0 * ((zlo & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) + 4.0)
            for i in tl.static_range(4):
                xp = x04 if i == 0 else (x15 if i == 1 else (x26 if i == 2 else x37))
                x_lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                h += x_lo * (((qw >> (4 * i)) & 15).to(tl.float32) - z) / 256.0
                h += x_hi * (((qw >> (4 * i + 16)) & 15).to(tl.float32) - z) / 256.0
            return h

    @triton.jit
    def _hadd2(a, b):
        """Sum of two half2 values held as int32 bits (a reduction's combine step)."""
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _x_lane_pairs(x32, r, PAIRED: tl.constexpr):
        """The fp16 inputs of packed rows r as the lane pairs (i, i + 4) of a packed word: (x0, x4), (x1, x5),
        (x2, x6), (x3, x7), each as int32 bits. PAIRED: stored already in pair order (within each run of 8: x0 x4
        x1 x5 x2 x6 x3 x7, as the fused kernels write their scratch row), each row's four pairs in one 16-byte load
        (a [rows, 4] tile split into its columns): a tile's inputs in 8 asynchronous copies instead of 32 in the
        fused kernels' pipelined loop. Else read in order as four int32 pairs (x0 x1 | x2 x3 | x4 x5 | x6 x7) and
        regrouped by shifts and masks."""
        if PAIRED:
            a02, a13 = tl.split(tl.reshape(tl.load(x32 + r * 4 + tl.arange(0, 4)[None, :]), [r.shape[0], 2, 2]))
            p0, p2 = tl.split(a02)
            p1, p3 = tl.split(a13)
            return p0[:, None], p1[:, None], p2[:, None], p3[:, None]
        p0 = tl.load(x32 + r * 4)
        p1 = tl.load(x32 + r * 4 + 1)
        p2 = tl.load(x32 + r * 4 + 2)
        p3 = tl.load(x32 + r * 4 + 3)
        return ((p0 & 0xFFFF) | (p2 << 16), ((p0 >> 16) & 0xFFFF) | (p2 & -65536),
                (p1 & 0xFFFF) | (p3 << 16), ((p1 >> 16) & 0xFFFF) | (p3 & -65536))

    @triton.jit
    def _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS: tl.constexpr, SUB: tl.constexpr):
        """Iteration `it`'s packed words [ROWS, BLOCK_N], 256 x scales and the zero terms of `_int4_word_fma` as
        half2 bits (official layout, groups in order)."""
        g = it // SUB
        qw = tl.load(qw_ptr + (it * ROWS + rows) * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) * 256.0
        z = ((tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_mask, other=0) >> ((offs_n % 8) * 4)) & 15) + 1
        zlo = (z | 0x4400) ^ 0x8000  # -(4 + z/256) as fp16 bits: exponent of 4, z in the low mantissa
        zhi = ((z << 4) | 0x3400) ^ 0x8000  # -(1/4 + z/256): a mantissa step is 2^-12 there
        return qw, s, (zlo | (zlo << 16))[None, :], (zhi | (zhi << 16))[None, :]

    @triton.jit
    def _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS: tl.constexpr, ASM: tl.constexpr, PAIRED: tl.constexpr):
        """sum over the tile's inputs of x_k * w_kn for each column: [BLOCK_N] fp32 (x32: the fp16 inputs read
        as int32 pairs; PAIRED: how they are stored, `_x_lane_pairs`)."""
        x04, x15, x26, x37 = _x_lane_pairs(x32, it * ROWS + rows, PAIRED)
        if ASM:
            h = tl.reduce(_int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, qw * 0, ASM), 0, _hadd2)
            lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = ((h >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            return s * (lo + hi)
        h = _int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, tl.zeros(qw.shape, dtype=tl.float32), ASM)
        return s * tl.sum(h, axis=0)

    @triton.jit
    def _gemv_kernel_v4(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K,
                        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr, ASM: tl.constexpr, STAGES: tl.constexpr):
        """Int4 GEMV, BLOCK_K inputs (a group or a part of one) per iteration on a tile [BLOCK_K/8 rows, BLOCK_N]
        of packed words. With BLOCK_N = 128 x num_warps Triton gives each thread 4 columns (one 16-byte load per
        row) and every row, so the thread sums the block's rows in half2 (`_int4_word_fma`, 13 instructions per
        word, then one HADD2 per row) and applies the group's scale once per block: no reduction across threads
        until the end. Iterations go through `tl.range(num_stages=STAGES)` (cp.async into shared memory ahead of
        use when STAGES > 1), each a `_w_tile` and a `_w_dot` (inputs in natural order)."""
        ROWS: tl.constexpr = BLOCK_K // 8  # packed rows per iteration
        SUB: tl.constexpr = GROUP // BLOCK_K  # iterations per group
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in tl.range(pid_k, K // BLOCK_K, SPLIT_K, num_stages=STAGES):
            qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS, SUB)
            acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS, ASM, False)
        _store_output(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k, HAS_BIAS, SPLIT_K,
                      FUSED_REDUCE, BLOCK_N)
