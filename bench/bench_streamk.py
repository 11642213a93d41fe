"""Whether a stream-K batch-1 Int4 GEMV beats v4: an experiment (the product path is unchanged).

v4 launches a program per (column block, K split): at the Qwen-7B shapes each program takes 2 iterations, so
every program loads, then computes, in one wave, and the unpacking is not hidden behind the loads (run 11: v4
without its split-K epilogue is 11.3 µs a layer above its loads-only floor). Here a fixed number of programs (a
multiple of the SM count) each take an equal run of consecutive (column block, K tile) work units, pipelined
(`tl.range(num_stages)`), and add their partial sums into the float32 workspace once per column block they touch;
the program completing a column block's K tiles writes its output.

Per shape, 8 distinct weights replayed back to back from a CUDA graph (`bench_quant.graph_us`): v4 as the
table runs it, stream-K loads only (no arithmetic), stream-K at several settings, and the copy bound.

    cd bench && PYTHONPATH=..:. python bench_streamk.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench_quant import GEMV_SHAPES, graph_us, v4_baseline
from benchlib import copy_bandwidth, log, save_json
from qwenlm.kernels.gptq_gemv import _w_dot, _w_tile, _xor

COPIES = 8
# (BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM)
CONFIGS = [(512, 128, 4, 2, 1), (512, 128, 4, 3, 1), (512, 64, 4, 3, 1), (512, 64, 4, 4, 1), (256, 128, 2, 3, 1),
           (256, 128, 2, 3, 2), (256, 64, 2, 4, 2), (512, 128, 4, 2, 2), (512, 64, 4, 3, 2), (1024, 128, 8, 2, 1),
           (1024, 64, 8, 3, 1), (256, 128, 2, 2, 3)]


@triton.jit
def _streamk_int4(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, P, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, LOADS_ONLY: tl.constexpr,
                  ASM: tl.constexpr = True):
    ROWS: tl.constexpr = BLOCK_K // 8
    SUB: tl.constexpr = GROUP // BLOCK_K
    pid = tl.program_id(0)
    KT = K // BLOCK_K
    total = (N // BLOCK_N) * KT
    start = pid * total // P
    end = (pid + 1) * total // P
    lane = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)[:, None]
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    t = start
    while t < end:
        cb = t // KT
        k0 = t - cb * KT
        k1 = tl.minimum(KT, end - cb * KT)
        offs_n = cb * BLOCK_N + lane
        n_mask = offs_n < N
        if LOADS_ONLY:
            acc_i = tl.zeros([BLOCK_N], dtype=tl.int32)
            for it in tl.range(k0, k1, num_stages=STAGES):
                acc_i ^= tl.reduce(tl.load(qw_ptr + (it * ROWS + rows) * N + offs_n[None, :]), 0, _xor)
            tl.store(out_ptr + pid * 0 + offs_n, acc_i.to(tl.float32).to(tl.float16))
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for it in tl.range(k0, k1, num_stages=STAGES):
                qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS, SUB)
                acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS, ASM, False)
            if ASM:
                tl.atomic_add(ws_ptr + offs_n, acc, sem="relaxed")
            else:
                tl.atomic_add(ws_ptr + offs_n, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + cb, k1 - k0)  # acq_rel, gpu scope
            if arrived + (k1 - k0) == KT:
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                y = tl.atomic_add(ws_ptr + offs_n, zero)
                tl.store(out_ptr + offs_n, y.to(tl.float16))
                tl.debug_barrier()
                tl.store(ws_ptr + offs_n, zero)
                tl.store(cnt_ptr + cb, 0)
        t = cb * KT + k1


def streamk(x, w, out, wsp, cfg, n_sm, loads_only=False, asm=True):
    qweight, qzeros, scales = w
    K, N = x.shape[1], qweight.shape[1]
    block_n, block_k, warps, stages, per_sm = cfg
    P = n_sm * per_sm
    _streamk_int4[(P,)](x, qweight, qzeros, scales, out, wsp[0], wsp[1], N, K, P, GROUP=128, BLOCK_N=block_n,
                        BLOCK_K=block_k, STAGES=stages, LOADS_ONLY=loads_only, ASM=asm,
                        num_warps=warps, num_stages=stages)
    return out


def main():
    bw = copy_bandwidth("cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s, {n_sm} SMs")
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        ws, mb, x, v4, ref = v4_baseline(name, k, n, bw, COPIES)
        rows.append(dict(linear=name, MB=round(mb, 1), v4_us=round(v4, 2), bound_us=round(mb * 1e12 / bw, 2)))
        out = torch.empty(1, n, device="cuda", dtype=torch.float16)
        sk_ws = (torch.zeros(n, device="cuda", dtype=torch.float32),
                 torch.zeros(n // 128 + 1, device="cuda", dtype=torch.int32))
        for cfg in CONFIGS:
            if n % cfg[0]:
                continue
            try:
                got = streamk(x, ws[0], out, sk_ws, cfg, n_sm).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                again = streamk(x, ws[0], out, sk_ws, cfg, n_sm).float()
                same = torch.equal(got, again) or ((got - again).abs().max() / ref.abs().max()).item() < 1e-3
                us = graph_us(lambda w: streamk(x, w, out, sk_ws, cfg, n_sm), ws)
                lo = graph_us(lambda w: streamk(x, w, out, sk_ws, cfg, n_sm, loads_only=True), ws)
            except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
                log(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:1500]}")
                continue
            rows.append(dict(linear=name, config=cfg, us=round(us, 2), loads_only_us=round(lo, 2), err=err,
                             repeat_ok=bool(same)))
            log(f"  stream-K (BN, BK, warps, stages, per SM) {cfg}: {us:6.2f} us ({mb * 1e3 / us:4.0f} GB/s), "
                f"loads only {lo:6.2f} us, rel err {err:.1e}, repeat ok {same}")
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_streamk.json")


if __name__ == "__main__":
    main()
