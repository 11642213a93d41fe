"""Batch-1 Int4 GEMV weight tiles by the copy engine (TMA tensor descriptors) and Triton's warp specialisation (a
producer warp loading while the others compute), against pointer loads: an experiment for the batch-1 Int4 path;
the product is unchanged.

One stream-K kernel (the fused kernel's grid of runs of (column block, K tile) units, fp16 input read in place,
v4's half2 arithmetic `_w_dot`), its partial sums added into a float32 row with atomics (no arrival count, no
epilogue), with the packed words of each tile loaded
  pointer:      by `tl.load`, pipelined by `tl.range(num_stages)` (cp.async), as the product kernels do;
  descriptor:   by a host tensor descriptor (TMA), pipelined the same way;
  + WS:         the same with `tl.range(warp_specialize=True)`.
Per shape, 8 distinct weights replayed back to back from a CUDA graph, next to the product's fused kernel (its own
setting) and the copy bound; sums checked against the dequantized weights. TMA boxes are at most 256 wide, so
BLOCK_N is 256 (2 warps, 4 columns per thread as v4).

    cd bench && PYTHONPATH=..:. python bench_ws.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench_quant import graph_us
from bench_streamk import fused_baselines
from benchlib import copy_bandwidth, log, save_json
from qwenlm.kernels.gptq_fused import _sm_count
from qwenlm.kernels.gptq_int4 import _w_dot

COPIES = 8


@triton.jit
def _ws_gemv_kernel(x_ptr, qw_ptr, qw_desc, qz_ptr, s_ptr, ws_ptr, N, K, P, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, STAGES: tl.constexpr, DESC: tl.constexpr, WS: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_K // 8
    SUB: tl.constexpr = 128 // BLOCK_K
    pid = tl.program_id(0)
    KT = K // BLOCK_K
    start = pid * ((N // BLOCK_N) * KT) // P
    end = (pid + 1) * ((N // BLOCK_N) * KT) // P
    lane = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)[:, None]
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    t = start
    while t < end:
        cb = t // KT
        k1 = tl.minimum(KT, end - cb * KT)
        offs_n = cb * BLOCK_N + lane
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for it in tl.range(t - cb * KT, k1, num_stages=STAGES, warp_specialize=WS):
            if DESC:
                qw = qw_desc.load([it * ROWS, cb * BLOCK_N])
            else:
                qw = tl.load(qw_ptr + (it * ROWS + rows) * N + offs_n[None, :])
            g = it // SUB
            s = tl.load(s_ptr + g * N + offs_n).to(tl.float32) * 256.0
            z = ((tl.load(qz_ptr + g * (N // 8) + offs_n // 8) >> ((offs_n % 8) * 4)) & 15) + 1
            zlo = (z | 0x4400) ^ 0x8000
            zhi = ((z << 4) | 0x3400) ^ 0x8000
            acc += _w_dot(qw, s, (zlo | (zlo << 16))[None, :], (zhi | (zhi << 16))[None, :], x32, it, rows, ROWS,
                          True, False)
        tl.atomic_add(ws_ptr + offs_n, acc, sem="relaxed")
        t = cb * KT + k1


def ws_gemv(x, qweight, desc, qzeros, scales, ws, setting):
    block_n, block_k, per_sm, warps, stages, use_desc, use_ws = setting
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    P = min((N // block_n) * (K // block_k), per_sm * _sm_count(x.device))
    _ws_gemv_kernel[(P,)](x, qweight, desc, qzeros, scales, ws, N, K, P, BLOCK_N=block_n, BLOCK_K=block_k,
                          STAGES=stages, DESC=use_desc, WS=use_ws, num_warps=warps, num_stages=stages)


# (BLOCK_N, BLOCK_K, programs per SM, warps, stages, descriptor, warp specialisation)
SETTINGS = [(256, 64, 4, 2, 3, False, False), (256, 64, 4, 2, 3, True, False), (256, 64, 4, 2, 3, True, True),
            (256, 64, 2, 2, 4, True, True), (256, 128, 4, 2, 3, True, True), (256, 64, 4, 4, 3, True, True)]


def main():
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name, k, n, ws_, mb, xv, ref, fused in fused_baselines(bw, COPIES):
        acc = torch.zeros(n, device="cuda", dtype=torch.float32)
        for setting in SETTINGS:
            block_n, block_k = setting[:2]
            try:
                descs = [TensorDescriptor.from_tensor(w[0], [block_k // 8, block_n]) for w in ws_]
                acc.zero_()
                ws_gemv(xv, ws_[0][0], descs[0], ws_[0][1], ws_[0][2], acc, setting)
                err = ((acc - ref.view(-1)).abs().max() / ref.abs().max()).item()
                us = graph_us(lambda i: ws_gemv(xv, ws_[i][0], descs[i], ws_[i][1], ws_[i][2], acc, setting),
                              range(COPIES))
            except Exception as e:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
                log(f"  {setting}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            log(f"  {setting}: {us:6.2f} us ({mb * 1e3 / us:5.0f} GB/s, rel err {err:.1e})")
            rows.append(dict(linear=name, setting=setting, us=round(us, 2), fused_us=round(fused, 2), err=err))
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_ws.json")


if __name__ == "__main__":
    main()
