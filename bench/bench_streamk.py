"""The stream-K batch-1 Int4 GEMV (`qwenlm.kernels.gptq_fused`, fp16 input, no fused work) against v4, and the
floor of its grid: the same programs loading the same words with no arithmetic.

v4 launches a program per (column block, K split): at the Qwen-7B shapes each program takes 2 iterations, so
every program loads, then computes, in one wave, and the unpacking is not hidden behind the loads (run 11). The
fused kernel instead gives a fixed number of programs (a multiple of the SM count) an equal run of consecutive
(column block, K tile) work units, pipelined (`tl.range(num_stages)`), adding partial sums into the float32
workspace once per column block touched.

Per shape, 8 distinct weights replayed back to back from a CUDA graph (`bench_quant.graph_us`): v4 as the
table runs it, stream-K at several settings and its loads only, and the copy bound. (Until commit 5497e25 this
script carried its own copy of the stream-K GEMV; docs/benchmarks.md run 12's table came from that copy.) Next to
each setting's loads only, the same loads with the units handed out at run time (`_dynamic_loads_only`, chunks
of 2, 4, 8 units from a ticket counter): whether programs that start late or stream slowly hold the grid back.

    cd bench && PYTHONPATH=..:. python bench_streamk.py [--quick]   (--quick: 4 settings around the default)
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from bench_quant import GEMV_SHAPES, graph_us, v4_baseline
from benchlib import copy_bandwidth, log, save_json
from qwenlm.kernels.gptq_fused import _sm_count, fused_int4_gemv
from qwenlm.kernels.gptq_int4 import _xor
from qwenlm.model import quant

COPIES = 8
# (BLOCK_N, BLOCK_K, programs per SM, num_warps, num_stages), as gptq_fused.FUSED_DEFAULT
CONFIGS = [(512, 128, 1, 4, 2), (512, 128, 1, 4, 3), (512, 64, 1, 4, 3), (512, 64, 1, 4, 4), (256, 128, 1, 2, 3),
           (256, 128, 2, 2, 3), (256, 64, 2, 2, 4), (512, 128, 2, 4, 2), (512, 64, 2, 4, 3), (1024, 128, 1, 8, 2),
           (1024, 64, 1, 8, 3), (256, 128, 3, 2, 2)]
QUICK = [(512, 64, 2, 4, 3), (512, 64, 4, 4, 3), (512, 64, 3, 4, 3), (512, 128, 2, 4, 2)]  # --quick


@triton.jit
def _run_loads(qw_ptr, N, K, pid, P, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Program pid's run of (column block, K tile) units of one GEMV on the fused kernel's grid, loaded and
    xor-folded into acc (the packed words only)."""
    ROWS: tl.constexpr = BLOCK_K // 8
    KT = K // BLOCK_K
    start = pid * ((N // BLOCK_N) * KT) // P
    end = (pid + 1) * ((N // BLOCK_N) * KT) // P
    lane = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)[:, None]
    t = start
    while t < end:
        cb = t // KT
        k1 = tl.minimum(KT, end - cb * KT)
        offs_n = cb * BLOCK_N + lane
        for it in tl.range(t - cb * KT, k1, num_stages=STAGES):
            acc ^= tl.reduce(tl.load(qw_ptr + (it * ROWS + rows) * N + offs_n[None, :]), 0, _xor)
        t = cb * KT + k1
    return acc


@triton.jit
def _streamk_loads_only(qw_ptr, out_ptr, N, K, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        STAGES: tl.constexpr):
    """The fused kernel's grid and runs of (column block, K tile) units, loading the packed words only; each
    program stores the xor of its run once (no atomics, no count)."""
    acc = _run_loads(qw_ptr, N, K, tl.program_id(0), P, tl.zeros([BLOCK_N], dtype=tl.int32), BLOCK_N, BLOCK_K,
                     STAGES)
    tl.store(out_ptr + (tl.program_id(0) % (N // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N), acc)


@triton.jit
def _dynamic_loads_only(qw_ptr, out_ptr, tick_ptr, N, K, P, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Loads only, the units handed out at run time: each program takes the next CHUNK units of one column block
    from a ticket counter (the following ticket requested while the chunk loads) until none are left, so programs
    that start early or stream faster take more. The last program to finish re-arms the counters."""
    ROWS: tl.constexpr = BLOCK_K // 8
    KT = K // BLOCK_K
    total = (N // BLOCK_N) * KT
    lane = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)[:, None]
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    t = tl.atomic_add(tick_ptr, CHUNK)
    while t < total:
        nxt = tl.atomic_add(tick_ptr, CHUNK)
        cb = t // KT
        offs_n = cb * BLOCK_N + lane
        k0 = t - cb * KT
        for it in tl.range(k0, k0 + CHUNK, num_stages=STAGES):
            acc ^= tl.reduce(tl.load(qw_ptr + (it * ROWS + rows) * N + offs_n[None, :]), 0, _xor)
        t = nxt
    tl.store(out_ptr + lane, acc)
    done = tl.atomic_add(tick_ptr + 1, 1)
    if done == P - 1:
        tl.store(tick_ptr, 0)
        tl.store(tick_ptr + 1, 0)


def dynamic_loads_only(w, out, ticks, cfg, chunk):
    qweight = w[0]
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    block_n, block_k, per_sm, warps, stages = cfg
    P = per_sm * _sm_count(qweight.device)
    _dynamic_loads_only[(P,)](qweight, out, ticks, N, K, P, CHUNK=chunk, BLOCK_N=block_n, BLOCK_K=block_k,
                              STAGES=stages, num_warps=warps, num_stages=stages)


def layer_of(w, k, n):
    """A GPTQLinear (Int4, group 128, no bias, Triton backend) holding the weights w = (qweight, qzeros, scales)."""
    layer = quant.GPTQLinear(k, n, 4, 128, bias=False, device="cuda")
    layer.qweight, layer.qzeros, layer.scales = w
    layer.prepare_kernel("triton")
    return layer


def fused_baselines(bw, copies=COPIES):
    """Per Qwen-7B linear: (name, K, N, the `copies` weights, their MB, the fp16 input [K], the reference output,
    the product's fused kernel µs at its own setting), v4 and the copy bound logged (`v4_baseline`)."""
    for name, (k, n) in GEMV_SHAPES.items():
        ws, mb, x, _, ref = v4_baseline(name, k, n, bw, copies)
        xv = x.view(-1)
        layers = [layer_of(w, k, n) for w in ws]
        fused = graph_us(lambda l: fused_int4_gemv(xv, l), layers)
        log(f"{name:12s} {mb:5.1f} MB: product fused kernel {fused:6.2f} us, copy bound {mb * 1e12 / bw:5.2f} us")
        yield name, k, n, ws, mb, xv, ref, fused


def loads_only(w, out, cfg):
    qweight = w[0]
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    block_n, block_k, per_sm, warps, stages = cfg
    P = min((N // block_n) * (K // block_k), per_sm * _sm_count(qweight.device))
    _streamk_loads_only[(P,)](qweight, out, N, K, P, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                              num_warps=warps, num_stages=stages)


def main():
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s, {_sm_count(torch.device('cuda', 0))} SMs")
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        ws, mb, x, v4, ref = v4_baseline(name, k, n, bw, COPIES)
        rows.append(dict(linear=name, MB=round(mb, 1), v4_us=round(v4, 2), bound_us=round(mb * 1e12 / bw, 2)))
        layers = [layer_of(w, k, n) for w in ws]
        xv = x.view(-1)
        scratch = torch.empty(n, device="cuda", dtype=torch.int32)
        for cfg in QUICK if "--quick" in sys.argv else CONFIGS:
            if n % cfg[0]:
                continue
            try:
                got = fused_int4_gemv(xv, layers[0], config=cfg).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(lambda l: fused_int4_gemv(xv, l, config=cfg), layers)
                lo = graph_us(lambda w: loads_only(w, scratch, cfg), ws)
            except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
                log(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:1500]}")
                continue
            dyn = {}
            ticks = torch.zeros(2, device="cuda", dtype=torch.int32)
            for chunk in (2, 4, 8):
                if (k // cfg[1]) % chunk == 0:
                    dyn[chunk] = round(graph_us(lambda w: dynamic_loads_only(w, scratch, ticks, cfg, chunk), ws), 2)
            rows.append(dict(linear=name, config=cfg, us=round(us, 2), loads_only_us=round(lo, 2), err=err,
                             dynamic_loads_only_us=dyn))
            log(f"  {cfg}: loads only, units handed out at run time, by chunk: {dyn}")
            log(f"  stream-K (BN, BK, per SM, warps, stages) {cfg}: {us:6.2f} us ({mb * 1e3 / us:4.0f} GB/s), "
                f"loads only {lo:6.2f} us, rel err {err:.1e}")
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_streamk.json")


if __name__ == "__main__":
    main()
