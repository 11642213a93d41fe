"""The floor of streaming a decode layer's Int4 weights: separate launches against one persistent kernel (an
experiment for the batch-1 Int4 path; the product is unchanged).

The packed words (qweight) of a Qwen-7B layer's four GEMVs (c_attn, attn c_proj, gate_up, mlp c_proj: 101 MB)
for 8 layers, loaded with no arithmetic on the fused kernel's stream-K grid (`bench_streamk._streamk_loads_only`'s
runs of (column block, K tile) units, `gptq_fused.FUSED_DEFAULT`), replayed from a CUDA graph, µs per layer:
  separate:        four launches per layer, as the fused decode path launches its GEMVs;
  separate + PDL:  the same, each launch letting the next start at once and waiting for the one before only at
                   its end (no data flows between them, so this is the most PDL could overlap);
  persistent:      one launch per layer (or for all 8 layers) in which every program streams its run of each
                   GEMV in turn, with no wait between GEMVs (the floor of a kernel that keeps the weights
                   streaming across the step) or a grid-wide wait between GEMVs (a count in global memory), as
                   a persistent step kernel would need, with the next GEMV's first 1, 2 or 4 tiles loaded before
                   each wait;
  copy bound:      the bytes at the measured copy bandwidth.

    cd bench && PYTHONPATH=..:. python bench_layer_floor.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench_quant import GEMV_SHAPES, graph_us
from bench_streamk import _run_loads
from benchlib import copy_bandwidth, log, save_json
from qwenlm.kernels.gptq_fused import FUSED_DEFAULT, _sm_count
from qwenlm.kernels.gptq_int4 import _xor
from qwenlm.kernels.sync import gdc_launch_dependents, gdc_wait

LAYERS = 8


@triton.jit
def _first_tiles(qw_ptr, N, K, pid, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE: tl.constexpr):
    """The first PRE tiles of program pid's run of one GEMV, loaded and xor-folded (a prefetch into registers)."""
    ROWS: tl.constexpr = BLOCK_K // 8
    KT = K // BLOCK_K
    start = pid * ((N // BLOCK_N) * KT) // P
    rows = tl.arange(0, ROWS)[:, None]
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in tl.static_range(PRE):
        t = start + i
        cb = t // KT
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc ^= tl.reduce(tl.load(qw_ptr + ((t - cb * KT) * ROWS + rows) * N + offs_n[None, :]), 0, _xor)
    return acc


@triton.jit
def _one_loads(qw_ptr, out_ptr, N, K, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
               PDL: tl.constexpr):
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    acc = _run_loads(qw_ptr, N, K, pid, P, tl.zeros([BLOCK_N], dtype=tl.int32), BLOCK_N, BLOCK_K, STAGES)
    if PDL:
        gdc_wait()
    tl.store(out_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), acc)


@triton.jit
def _persistent_loads(q0, q1, q2, q3, out_ptr, sync_ptr, L, P, N0, K0, N1, K1, N2, K2, N3, K3,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, BARRIER: tl.constexpr,
                      PRE: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    phase = 0
    for layer in range(L):
        for g in tl.static_range(4):
            if g == 0:
                acc = _run_loads(q0 + layer * (K0 // 8) * N0, N0, K0, pid, P, acc, BLOCK_N, BLOCK_K, STAGES)
            elif g == 1:
                acc = _run_loads(q1 + layer * (K1 // 8) * N1, N1, K1, pid, P, acc, BLOCK_N, BLOCK_K, STAGES)
            elif g == 2:
                acc = _run_loads(q2 + layer * (K2 // 8) * N2, N2, K2, pid, P, acc, BLOCK_N, BLOCK_K, STAGES)
            else:
                acc = _run_loads(q3 + layer * (K3 // 8) * N3, N3, K3, pid, P, acc, BLOCK_N, BLOCK_K, STAGES)
            if BARRIER:  # every program's run of this GEMV is loaded before any program goes on
                phase += 1
                tl.debug_barrier()
                tl.atomic_add(sync_ptr, 1)
                if PRE > 0:  # the next GEMV's first tiles are loaded while waiting (then again, from L2, by its run)
                    nxt = tl.minimum(layer + 1, L - 1)
                    if g == 0:
                        pre = _first_tiles(q1 + layer * (K1 // 8) * N1, N1, K1, pid, P, BLOCK_N, BLOCK_K, PRE)
                    elif g == 1:
                        pre = _first_tiles(q2 + layer * (K2 // 8) * N2, N2, K2, pid, P, BLOCK_N, BLOCK_K, PRE)
                    elif g == 2:
                        pre = _first_tiles(q3 + layer * (K3 // 8) * N3, N3, K3, pid, P, BLOCK_N, BLOCK_K, PRE)
                    else:
                        pre = _first_tiles(q0 + nxt * (K0 // 8) * N0, N0, K0, pid, P, BLOCK_N, BLOCK_K, PRE)
                seen = tl.load(sync_ptr, volatile=True)
                while seen < phase * P:
                    seen = tl.load(sync_ptr, volatile=True)
                if PRE > 0:
                    acc ^= pre
    tl.store(out_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), acc)
    if BARRIER:  # the last program out re-arms the count
        if tl.atomic_add(sync_ptr + 1, 1) == P - 1:
            tl.store(sync_ptr, 0)
            tl.store(sync_ptr + 1, 0)


def main():
    bw = copy_bandwidth("cuda")
    block_n, block_k, per_sm, warps, stages = FUSED_DEFAULT
    P = per_sm * _sm_count(torch.device("cuda", 0))
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s; grid {P} programs, {FUSED_DEFAULT}")
    shapes = list(GEMV_SHAPES.values())  # c_attn, attn c_proj, gate_up, mlp c_proj: (K, N)
    weights = [torch.randint(-2**31, 2**31 - 1, (LAYERS, k // 8, n), device="cuda", dtype=torch.int32)
               for k, n in shapes]
    mb = sum(k // 8 * n * 4 for k, n in shapes) / 1e6
    out = torch.empty(P * block_n, device="cuda", dtype=torch.int32)
    sync = torch.zeros(2, device="cuda", dtype=torch.int32)
    kw = dict(BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps, num_stages=stages)
    dims = [d for k, n in shapes for d in (n, k)]

    def separate(layer, pdl):
        for w, (k, n) in zip(weights, shapes):
            _one_loads[(P,)](w[layer], out, n, k, P, PDL=pdl, **kw, **({"launch_pdl": True} if pdl else {}))

    def persistent(layers, barrier, pre=0):
        first = layers[0]
        _persistent_loads[(P,)](*(w[first] for w in weights), out, sync, len(layers), P, *dims, BARRIER=barrier,
                                PRE=pre, **kw)

    rows = {}
    for label, call, copies, per in [
            ("separate", lambda i: separate(i, False), range(LAYERS), 1),
            ("separate + PDL", lambda i: separate(i, True), range(LAYERS), 1),
            ("persistent, a launch per layer, no wait", lambda i: persistent([i], False), range(LAYERS), 1),
            ("persistent, a launch per layer, grid-wide waits", lambda i: persistent([i], True), range(LAYERS), 1),
            ("persistent, one launch for 8 layers, no wait", lambda i: persistent(range(LAYERS), False), [0],
             LAYERS),
            ("persistent, one launch for 8 layers, grid-wide waits", lambda i: persistent(range(LAYERS), True), [0],
             LAYERS),
            ("  + the next GEMV's first tile loaded before each wait", lambda i: persistent(range(LAYERS), True, 1),
             [0], LAYERS),
            ("  + its first 2 tiles", lambda i: persistent(range(LAYERS), True, 2), [0], LAYERS),
            ("  + its first 4 tiles", lambda i: persistent(range(LAYERS), True, 4), [0], LAYERS)]:
        us = graph_us(call, copies) / per
        rows[label] = round(us, 2)
        log(f"{label:55s} {us:6.2f} us per layer ({mb * 1e3 / us:5.0f} GB/s)")
    assert not sync.any()
    log(f"{'copy bound':55s} {mb * 1e12 / bw:6.2f} us per layer ({mb:.1f} MB)")
    save_json(dict(copy_GBs=bw / 1e9, MB=mb, us_per_layer=rows), "bench_layer_floor.json")


if __name__ == "__main__":
    main()
