"""Where the time of a batch-1 Int4 GEMV goes, and whether a CUDA kernel reducing split-K through a thread-block
cluster's distributed shared memory beats the Triton v4 GEMV: an experiment (the product path is unchanged).

Per Qwen-7B shape, 8 distinct weights replayed back to back from a CUDA graph (as the decode graph runs them):
- the v4 GEMV as the table runs it (`qwenlm.kernels.gptq_gemv.gemv`);
- v4's loop with each program storing its partial sums to its own row (no atomics, no count, no epilogue): what
  the split-K reduction costs;
- v4's grid loading the same words and doing no arithmetic: what the unpacking and sums add;
- torch's copy of the qweight (reads and writes it);
- `cluster_gemv.int4_gemv` (NVRTC-compiled CUDA, bench/cluster_gemv.py) at several settings.

    cd bench && PYTHONPATH=..:. python bench_cluster.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench_quant import GEMV_SHAPES, graph_us, v4_baseline
from benchlib import copy_bandwidth, log, save_json
from cluster_gemv import int4_gemv
from qwenlm.kernels.gptq_gemv import gemv_config
from qwenlm.kernels.gptq_int4 import _w_dot, _w_tile, _xor

COPIES = 8


@triton.jit
def _read_floor_v4(qw_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """v4's grid and tiles ([16 packed rows, BLOCK_N] per iteration, split-K over programs), loads only; each
    program stores its xor to its own row of out [SPLIT_K, N]: no atomics, no count."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)[:, None]
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for it in tl.range(tl.program_id(1), K // 128, SPLIT_K, num_stages=STAGES):
        acc ^= tl.reduce(tl.load(qw_ptr + (it * 16 + rows) * N + offs_n[None, :]), 0, _xor)
    tl.store(out_ptr + tl.program_id(1) * N + offs_n, acc)


@triton.jit
def _v4_no_reduce(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                  STAGES: tl.constexpr):
    """v4's loop as it is, each program storing its partial sums to its own row of out [SPLIT_K, N] (not summed):
    what v4 costs without its split-K epilogue."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, 16)[:, None]
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in tl.range(tl.program_id(1), K // 128, SPLIT_K, num_stages=STAGES):
        qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, 16, 1)
        acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, 16, True, False)
    tl.store(out_ptr + tl.program_id(1) * N + offs_n, acc)


def v4_floors(x, w, out, no_reduce):
    qweight, qzeros, scales = w
    K, N = x.shape[1], qweight.shape[1]
    block_n, _, split_k, warps, stages = gemv_config(4, N, K)[:5]
    grid = (N // block_n, split_k)
    if no_reduce:
        _v4_no_reduce[grid](x, qweight, qzeros, scales, out, N, K, BLOCK_N=block_n, SPLIT_K=split_k, STAGES=stages,
                            num_warps=warps, num_stages=stages)
    else:
        _read_floor_v4[grid](qweight, out, N, K, BLOCK_N=block_n, SPLIT_K=split_k, STAGES=stages, num_warps=warps,
                             num_stages=stages)


# (BN, CL, TG, RC, D)
CONFIGS = [(256, 4, 4, 4, 4), (256, 8, 4, 4, 4), (256, 8, 4, 8, 2), (256, 8, 8, 4, 2), (256, 8, 2, 8, 4),
           (512, 8, 2, 4, 4), (128, 8, 8, 4, 4), (256, 8, 4, 4, 8), (256, 8, 4, 2, 8), (256, 8, 8, 2, 4),
           (512, 8, 4, 2, 4)]


def main():
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        ws, mb, x, v4, ref = v4_baseline(name, k, n, bw, COPIES)
        part = torch.empty(16 * n, device="cuda", dtype=torch.float32)
        nr = graph_us(lambda w: v4_floors(x, w, part, True), ws)
        rf = graph_us(lambda w: v4_floors(x, w, part.view(torch.int32), False), ws)
        dst = [torch.empty_like(w[0]) for w in ws]
        cp = graph_us(lambda i: dst[i].copy_(ws[i][0]), list(range(COPIES)))
        rd = graph_us(lambda w: w[0].view(torch.int64).sum(dim=0, dtype=torch.int64), ws)
        log(f"  v4 without its split-K epilogue {nr:6.2f} us, v4 grid loads only {rf:6.2f} us, torch copy of the "
            f"qweight {cp:6.2f} us (read + write), torch column sum of it {rd:6.2f} us")
        rows.append(dict(linear=name, MB=round(mb, 1), v4_us=round(v4, 2), v4_no_reduce_us=round(nr, 2),
                         v4_loads_only_us=round(rf, 2), copy_us=round(cp, 2), torch_sum_us=round(rd, 2)))
        for cfg in CONFIGS:
            if n % cfg[0]:
                continue
            try:
                got = int4_gemv(x, *ws[0], cfg).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(lambda w: int4_gemv(x, *w, cfg), ws)
            except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
                log(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:2000]}")
                continue
            rows.append(dict(linear=name, MB=round(mb, 1), config=cfg, us=round(us, 2), err=err))
            log(f"  cluster GEMV (BN, CL, TG, RC, D) {cfg}: {us:6.2f} us ({mb * 1e3 / us:4.0f} GB/s), "
                f"rel err {err:.1e}")
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_cluster.json")


if __name__ == "__main__":
    main()
