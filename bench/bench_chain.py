"""A chain of dependent batch-1 Int4 GEMVs (x_{l+1} = fp16(W_l x_l), n x n, distinct weights) in one
persistent warp-specialised launch whose weight streaming never waits for the chain, against the product's fused
Triton GEMVs chained through programmatic dependent launch: an experiment (docs/benchmarks.md, quantization run 16).

In each CTA one producer thread streams the weights of every GEMV of the chain, in order, into a ring of
shared-memory stages (`mma_gemv.repack_ws` blocks, one cp.async.bulk each); weights never depend on activations,
so it runs ahead of the chain by as many stages as the ring holds, across GEMV boundaries. The consumer warps
(tensor-core sums, `mma_gemv` MATH 2) wait for GEMV l - 1 to be complete (a count of finished column runs in
global memory), stage its output, consume their stages, and add partial sums; the last CTA of a column run writes
its outputs and counts the run finished. What this measures: how close dependent GEMVs get to the copy bound when
the loads are decoupled from the dependencies.

    PYTHONPATH=.:bench python bench/bench_chain.py [--n 4096] [--layers 16] [--stages 8] [--split 8]
"""

from __future__ import annotations

import argparse
import ctypes
import functools

import torch

from bench_fused import layer_of
from bench_quant import graph_us
from benchlib import copy_bandwidth, log, save_json
from mma_gemv import _common_source, repack_fragments
from ws_gemv import WS_COMMON, _ws_stage_bytes, repack_ws
from qwenlm.kernels.gptq_fused import fused_int4_gemv

CHAIN_SOURCE = WS_COMMON + r"""
__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
  unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }

extern "C" __global__ void __launch_bounds__(WS_THREADS) chain_ws(const unsigned char *__restrict__ B,
    unsigned short *xbuf, float *ws, unsigned *cnt, unsigned *done, int N, int NL, int split) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long bars[2 * S];
  __shared__ int last;
  const int K = N, G = K / 128, gpt = G / split, RUNS = N / COLS, items = RUNS * split;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint4 *xs = reinterpret_cast<uint4 *>(ring + S * STAGE_BYTES);
  float *xsum = reinterpret_cast<float *>(xs + gpt * 16);
  const unsigned full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[S]), ring0 = smem_u32(ring);
  init_ring(full0, empty0);
  if (warp == 0) {  // producer: every stage of every GEMV this CTA takes, in the consumers' order
    if (lane == 0) {
      int i = 0;
      for (int l = 0; l < NL; l++)
        for (int item = blockIdx.x; item < items; item += gridDim.x) {
          const int run = item % RUNS, g0 = (item / RUNS) * gpt;
          for (int gg = 0; gg < gpt; gg++, i++) {
            const int s = i % S;
            if (i >= S) mbar_wait(empty0 + 8 * s, ((i / S) - 1) & 1);
            mbar_expect_tx(full0 + 8 * s, STAGE_BYTES);
            bulk_g2s(ring0 + s * STAGE_BYTES, B + (((size_t)l * RUNS + run) * G + g0 + gg) * STAGE_BYTES,
                     STAGE_BYTES, full0 + 8 * s);
          }
        }
    }
    return;
  }
  const int ct = threadIdx.x - 32, cw = warp - 1, g = lane / 4, t = lane % 4;
  int i = 0;
  for (int l = 0; l < NL; l++)
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      const int run = item % RUNS, g0 = (item / RUNS) * gpt, col0 = run * COLS;
      if (l > 0 && ct == 0)
        while (ld_acquire(done + l - 1) < (unsigned)RUNS) __nanosleep(20);
      CBAR();
      stage_inputs(xs, xsum, reinterpret_cast<const unsigned *>(xbuf + (size_t)l * K), g0, gpt, ct, cw, lane);
      CBAR();
      float acc[CB][2];
#pragma unroll
      for (int c = 0; c < CB; c++) acc[c][0] = acc[c][1] = 0.f;
      for (int gg = 0; gg < gpt; gg++, i++) {
        const int s = i % S;
        mbar_wait(full0 + 8 * s, (i / S) & 1);
        consume_stage(acc, ring + s * STAGE_BYTES, empty0 + 8 * s, xs, xsum, gg, cw, lane);
      }
      float *wsl = ws + (size_t)l * N;
      if (t == 0) {
#pragma unroll
        for (int c = 0; c < CB; c++) {
          const int col = col0 + (cw * CB + c) * 16 + g;
          atomicAdd(wsl + col, acc[c][0]);
          atomicAdd(wsl + col + 8, acc[c][1]);
        }
      }
      __threadfence();
      CBAR();
      if (ct == 0) last = atomicAdd(cnt + l * RUNS + run, 1u) == (unsigned)split - 1;
      CBAR();
      if (last) {
        __threadfence();
        for (int q = ct; q < COLS; q += WARPS * 32)
          xbuf[(size_t)(l + 1) * K + col0 + q] = f2h(atomicExch(wsl + col0 + q, 0.f));
        __threadfence();
        CBAR();
        if (ct == 0) { cnt[l * RUNS + run] = 0; atomicAdd(done + l, 1u); }
      }
      CBAR();  // xs is restaged for the next item
    }
}
"""


@functools.lru_cache(maxsize=None)
def _chain_kernel(warps: int, cb: int, stages: int):
    defines = f"#define WARPS {warps}\n#define CB {cb}\n#define S {stages}\n#define MAXG 96\n#define MATH 2\n" \
              f"#define EPI 0\n#define DEPTH 2\n"
    kernel = torch.cuda._compile_kernel(defines + _common_source() + CHAIN_SOURCE, "chain_ws")
    kernel.set_shared_memory_config(stages * _ws_stage_bytes(warps, cb) + 96 * 260)
    return kernel


def max_blocks_per_sm(kernel, threads: int, smem: int) -> int:
    """CTAs of `kernel` an SM holds at once (cuOccupancyMaxActiveBlocksPerMultiprocessor): a persistent grid larger
    than this times the SMs would wait forever on CTAs that never start."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    n = ctypes.c_int(0)
    err = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), kernel.func, ctypes.c_int(threads),
                                                          ctypes.c_size_t(smem))
    assert err == 0, f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: {err}"
    return n.value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096, help="each GEMV n x n (a multiple of 128)")
    ap.add_argument("--stages", default="8,4,12")
    ap.add_argument("--split", default="8,4,16")
    ap.add_argument("--ctas-per-sm", default="2,1")
    ap.add_argument("--shapes", default="4x2", help="consumer warps x column blocks per warp, comma-separated")
    args = ap.parse_args()
    n, NL = args.n, args.layers
    bw = copy_bandwidth("cuda")
    layers = [layer_of(n, n) for _ in range(NL)]
    mb = sum(t.numel() * t.element_size() for t in (layers[0].qweight, layers[0].qzeros, layers[0].scales)) / 1e6
    x0 = torch.randn(n, device="cuda", dtype=torch.float16)

    def triton_chain():
        x = x0
        for layer in layers:
            x = fused_int4_gemv(x, layer).view(-1)
        return x

    tri = graph_us(lambda _: triton_chain(), [0]) / NL
    log(f"{NL} chained {n} x {n} Int4 GEMVs ({mb:.1f} MB each): fused Triton GEMVs with PDL {tri:6.2f} us per "
        f"GEMV; copy bound {mb * 1e12 / bw:5.2f} us")
    rows = [dict(kernel="fused_triton_pdl", us_per_gemv=tri)]
    frags = [repack_fragments(layer.qweight) for layer in layers]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for warps, cb in [tuple(map(int, v.split("x"))) for v in args.shapes.split(",")]:
        blob = torch.stack([repack_ws(f, layer.qzeros, layer.scales, 16 * warps * cb)
                            for f, layer in zip(frags, layers)])
        xbuf = torch.zeros((NL + 1, n), device="cuda", dtype=torch.float16)
        xbuf[0] = x0
        ws = torch.zeros((NL, n), device="cuda", dtype=torch.float32)
        runs = n // (16 * warps * cb)
        cnt = torch.zeros(NL * runs, device="cuda", dtype=torch.int32)
        done = torch.zeros(NL, device="cuda", dtype=torch.int32)
        for stages in map(int, args.stages.split(",")):
            for split in map(int, args.split.split(",")):
                for per_sm in map(int, args.ctas_per_sm.split(",")):
                    gpt = n // 128 // split
                    grid = min(runs * split, per_sm * sms)
                    smem = stages * _ws_stage_bytes(warps, cb) + gpt * 260
                    kernel = _chain_kernel(warps, cb, stages)
                    fit = max_blocks_per_sm(kernel, 32 * (warps + 1), smem)
                    if grid > fit * sms:
                        log(f"  chain (stages {stages}, split {split}, {grid} CTAs): only {fit} CTAs per SM fit, "
                            "skipped")
                        continue

                    def call(_):
                        done.zero_()
                        kernel(grid=(grid, 1, 1), block=(32 * (warps + 1), 1, 1), shared_mem=smem,
                               args=[blob, xbuf, ws, cnt, done, n, NL, split])

                    try:
                        call(0)
                        torch.cuda.synchronize()
                        err = 0.0  # each GEMV against the Triton kernel on the same input
                        for li, layer in enumerate(layers):
                            want = fused_int4_gemv(xbuf[li], layer).float().view(-1)
                            err = max(err, ((xbuf[li + 1].float() - want).abs().max() / want.abs().max()).item())
                        us = graph_us(call, [0]) / NL
                    except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
                        log(f"  chain (stages {stages}, split {split}, {grid} CTAs): failed: {type(e).__name__}: "
                            f"{str(e)[:2000]}")
                        continue
                    log(f"  one persistent warp-specialised launch ({warps} x {cb}, stages {stages}, split {split}, "
                        f"{grid} CTAs): "
                        f"{us:6.2f} us per GEMV ({mb * 1e3 / us:4.0f} GB/s); each GEMV within {err:.1e} of the "
                        "Triton kernel's output on the same input")
                    rows.append(dict(kernel="chain_ws", warps=warps, cb=cb, stages=stages, split=split, ctas=grid,
                                     us_per_gemv=us,
                                     max_rel_err=err))
    save_json(dict(layers=NL, n=n, MB=mb, copy_GBs=bw / 1e9, rows=rows), f"bench_chain_{n}.json")


if __name__ == "__main__":
    main()
