"""How much of a batch-1 GEMV's fixed cost a persistent kernel would remove (an experiment, not a product path).

A chain of L dependent Int4 GEMVs at the attn.c_proj shape (4096 x 4096, group 128), x_{i+1} = W_i x_i, timed
from a CUDA graph on an H100:
  separate:    L launches of the fused GEMV kernel (qwenlm.kernels.gptq_fused at its default setting, a
               stream-K grid since quantization run 12; fp16 input read in place), as the fused decode path
               runs them;
  persistent:  one launch; every program handles the same (column block, K split) of each GEMV in turn, with a
               grid-wide barrier between GEMVs (an arrival counter; all programs are resident), or (dataflow)
               waiting only for the column blocks of the previous GEMV that hold its inputs; and either loads
               its first (prefetch 1) or both (prefetch 2) weight tiles of the next GEMV before waiting, or
               none (0).
Each GEMV's sums go to a float32 row (zeroed before the chain); the next one reads its inputs from there,
rounded to fp16 as the separate kernels' outputs are. The persistent results are checked against the separate
ones on a short chain.

    PYTHONPATH=..:. python bench_persistent.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench_quant import graph_us, random_gptq
from benchlib import copy_bandwidth, log
from qwenlm.kernels.gptq_fused import fused_int4_gemv
from qwenlm.kernels.gptq_int4 import _hadd2, _int4_word_fma, _w_dot, _w_tile
from qwenlm.model import quant

N = K = 4096
GROUP = 128
BLOCK_N, BLOCK_K, SPLIT_K, WARPS, STAGES = 256, 128, 16, 2, 3  # the GEMV table's setting for this shape
# (prefetch: K blocks held, dataflow, spin on volatile loads instead of atomics, inputs built in registers)
VARIANTS = ((0, False, False, False), (1, False, False, False), (1, True, False, False), (2, False, False, False),
            (1, False, True, False), (1, True, True, False), (1, False, True, True), (2, False, True, True),
            (1, True, True, True))


@triton.jit
def _count(ptr, SPIN_LOAD: tl.constexpr):
    """An arrival count: a volatile load (SPIN_LOAD) or an atomic read."""
    if SPIN_LOAD:
        return tl.load(ptr, volatile=True)
    return tl.atomic_add(ptr, 0)


@triton.jit
def _half(src, idx):
    return tl.load(src + idx, cache_modifier=".cg").to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _dot_f32(qw, s, zlo, zhi, src, it, rows, ROWS: tl.constexpr):
    """`_w_dot` with the inputs read from a float32 row and rounded to fp16 pairs in registers."""
    b = (it * ROWS + rows) * 8
    x04 = _half(src, b) | (_half(src, b + 4) << 16)
    x15 = _half(src, b + 1) | (_half(src, b + 5) << 16)
    x26 = _half(src, b + 2) | (_half(src, b + 6) << 16)
    x37 = _half(src, b + 3) | (_half(src, b + 7) << 16)
    h = tl.reduce(_int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, qw * 0, True), 0, _hadd2)
    lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((h >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s * (lo + hi)


@triton.jit
def _chain_kernel(x0_ptr, qw_ptr, qz_ptr, s_ptr, ws_ptr, xs_ptr, bar_ptr, L, N, K,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  PREFETCH: tl.constexpr, DATAFLOW: tl.constexpr, SPIN_LOAD: tl.constexpr,
                  XDIRECT: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_K // 8
    SUB: tl.constexpr = GROUP // BLOCK_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    programs = tl.num_programs(0) * tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, ROWS)[:, None]
    qw_stride = (K // 8) * N
    qz_stride = (K // GROUP) * (N // 8)
    s_stride = (K // GROUP) * N
    qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, pid_k, rows, offs_n, n_mask, N, ROWS, SUB)
    qw2, s2, zlo2, zhi2 = _w_tile(qw_ptr, qz_ptr, s_ptr, pid_k + SPLIT_K, rows, offs_n, n_mask, N, ROWS, SUB)
    for i in range(L):
        if not PREFETCH:
            qw, s, zlo, zhi = _w_tile(qw_ptr + i * qw_stride, qz_ptr + i * qz_stride, s_ptr + i * s_stride, pid_k,
                                      rows, offs_n, n_mask, N, ROWS, SUB)
        if DATAFLOW:  # wait only for the previous GEMV's column blocks that hold this program's inputs
            if i > 0:
                for it in range(pid_k, K // BLOCK_K, SPLIT_K):
                    blk = (it * BLOCK_K) // BLOCK_N
                    while _count(bar_ptr + (i - 1) * (N // BLOCK_N) + blk, SPIN_LOAD) < SPLIT_K:
                        pass
        # this GEMV's inputs: x0, or the previous GEMV's float32 sums rounded to fp16 (this program's K blocks)
        src = ws_ptr + i * N  # row 0: x0; row i: GEMV i-1's sums
        if XDIRECT:  # each thread builds its fp16 input pairs from the float32 row (no scratch round trip)
            acc = _dot_f32(qw, s, zlo, zhi, src, pid_k, rows, ROWS)
            if PREFETCH == 2:
                acc += _dot_f32(qw2, s2, zlo2, zhi2, src, pid_k + SPLIT_K, rows, ROWS)
        else:
            xs = xs_ptr + i * K
            for it in range(pid_k, K // BLOCK_K, SPLIT_K):
                kb = it * BLOCK_K + tl.arange(0, BLOCK_K)
                tl.store(xs + kb, tl.load(src + kb, cache_modifier=".cg").to(tl.float16))
            tl.debug_barrier()
            x32 = xs.to(tl.pointer_type(tl.int32), bitcast=True)
            acc = _w_dot(qw, s, zlo, zhi, x32, pid_k, rows, ROWS, True, False)
            if PREFETCH == 2:  # exactly two K blocks per program (K = 2 * SPLIT_K * BLOCK_K), both held
                acc += _w_dot(qw2, s2, zlo2, zhi2, x32, pid_k + SPLIT_K, rows, ROWS, True, False)
        for it in range(pid_k + SPLIT_K * (2 if PREFETCH == 2 else 1), K // BLOCK_K, SPLIT_K):
            t_qw, t_s, t_zlo, t_zhi = _w_tile(qw_ptr + i * qw_stride, qz_ptr + i * qz_stride, s_ptr + i * s_stride,
                                              it, rows, offs_n, n_mask, N, ROWS, SUB)
            if XDIRECT:
                acc += _dot_f32(t_qw, t_s, t_zlo, t_zhi, src, it, rows, ROWS)
            else:
                acc += _w_dot(t_qw, t_s, t_zlo, t_zhi, xs.to(tl.pointer_type(tl.int32), bitcast=True), it, rows,
                              ROWS, True, False)
        tl.atomic_add(ws_ptr + (i + 1) * N + offs_n, acc, mask=n_mask, sem="relaxed")
        if PREFETCH:  # the next GEMV's first tile: weights do not depend on this one's result
            j = tl.minimum(i + 1, L - 1)
            qw, s, zlo, zhi = _w_tile(qw_ptr + j * qw_stride, qz_ptr + j * qz_stride, s_ptr + j * s_stride, pid_k,
                                      rows, offs_n, n_mask, N, ROWS, SUB)
            if PREFETCH == 2:
                qw2, s2, zlo2, zhi2 = _w_tile(qw_ptr + j * qw_stride, qz_ptr + j * qz_stride, s_ptr + j * s_stride,
                                              pid_k + SPLIT_K, rows, offs_n, n_mask, N, ROWS, SUB)
        tl.debug_barrier()
        if DATAFLOW:  # this program's share of column block pid_n of GEMV i is in
            tl.atomic_add(bar_ptr + i * (N // BLOCK_N) + pid_n, 1)
        else:  # grid-wide barrier: every program's sums of GEMV i are in
            tl.atomic_add(bar_ptr, 1)  # acq_rel, gpu scope
            target = (i + 1) * programs
            while _count(bar_ptr, SPIN_LOAD) < target:
                pass


def chain_persistent(x0, stacked, ws, xs, bar, L, prefetch, dataflow=False, spin_load=False, xdirect=False):
    ws[0].copy_(x0)
    ws[1:].zero_()
    bar.zero_()
    qw, qz, s = stacked
    _chain_kernel[(N // BLOCK_N, SPLIT_K)](x0, qw, qz, s, ws, xs, bar, L, N, K, GROUP=GROUP, BLOCK_N=BLOCK_N,
                                           BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, PREFETCH=prefetch, DATAFLOW=dataflow,
                                           SPIN_LOAD=spin_load, XDIRECT=xdirect, num_warps=WARPS, num_stages=1)
    return ws[L]


def chain_separate(x0, layers):
    x = x0
    for layer in layers:
        x = fused_int4_gemv(x, layer).view(-1)
    return x


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bw = copy_bandwidth("cuda")
    L = 32
    parts = [random_gptq(K, N, 4) for _ in range(L)]
    for p in parts:  # scales that keep the chain's values of order one
        p[2].copy_((p[2].float() * 0.15).half())
    stacked = tuple(torch.stack([p[i] for p in parts]).contiguous() for i in range(3))
    layers = []
    for i in range(L):
        layer = quant.GPTQLinear(K, N, 4, GROUP, bias=False, device="cuda")
        layer.qweight, layer.qzeros, layer.scales = stacked[0][i], stacked[1][i], stacked[2][i]
        layer.g_idx = parts[i][3]
        layer.prepare_kernel("triton")
        layers.append(layer)
    x0 = torch.randn(K, device="cuda", dtype=torch.float16)
    ws = torch.zeros(L + 1, N, device="cuda", dtype=torch.float32)
    xs = torch.zeros(L, K, device="cuda", dtype=torch.float16)
    bar = torch.zeros(L * (N // BLOCK_N), device="cuda", dtype=torch.int32)  # grid barrier: [0]; dataflow: all
    for n in (1, 4):  # correctness on short chains
        want = chain_separate(x0, layers[:n]).float()
        for v in VARIANTS:
            got = chain_persistent(x0, stacked, ws, xs, bar, n, *v)
            err = ((got - want).abs().max() / want.abs().max()).item()
            log(f"chain of {n}, variant {v}: max rel diff vs separate kernels {err:.2e}")
            assert err < 2e-2, err
    mb = sum(t[0].numel() * t[0].element_size() for t in stacked) / 1e6
    sep = graph_us(lambda _: chain_separate(x0, layers), [0]) / L
    log(f"separate launches: {sep:6.2f} us per GEMV ({mb * 1e3 / sep:4.0f} GB/s); copy bound {mb * 1e12 / bw:5.2f}")
    for prefetch, dataflow, spin_load, xdirect in VARIANTS:
        us = graph_us(lambda _: chain_persistent(x0, stacked, ws, xs, bar, L, prefetch, dataflow, spin_load,
                                                 xdirect), [0]) / L
        log(f"persistent, prefetch {prefetch}, {'per-block waits' if dataflow else 'grid barrier'}, spin on "
            f"{'loads' if spin_load else 'atomics'}, inputs {'in registers' if xdirect else 'via scratch'}: "
            f"{us:6.2f} us per GEMV ({mb * 1e3 / us:4.0f} GB/s)")


if __name__ == "__main__":
    main()
