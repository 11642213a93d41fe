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
from mma_gemv import _common_source, repack_fragments, repack_ws
from qwenlm.kernels.gptq_fused import fused_int4_gemv

CHAIN_SOURCE = r"""
#define WS_THREADS ((WARPS + 1) * 32)
#define COLS (WARPS * CB * 16)
#define STAGE_BYTES (WARPS * CB * 1024 + COLS * 2 + COLS / 2)
#define CBAR() asm volatile("bar.sync 1, %0;" :: "n"(WARPS * 32) : "memory")

__device__ __forceinline__ unsigned smem_u32(const void *p) {
  unsigned a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a; }
__device__ __forceinline__ void mbar_init(unsigned a, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(a), "r"(count) : "memory"); }
__device__ __forceinline__ void mbar_expect_tx(unsigned a, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(a), "r"(bytes) : "memory"); }
__device__ __forceinline__ void mbar_arrive(unsigned a) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(a) : "memory"); }
__device__ __forceinline__ void mbar_wait(unsigned a, unsigned parity) {
  asm volatile("{ .reg .pred p; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra WAIT_%=; }"
               :: "r"(a), "r"(parity) : "memory"); }
__device__ __forceinline__ void bulk_g2s(unsigned dst, const void *src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory"); }
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
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; s++) { mbar_init(full0 + 8 * s, 1); mbar_init(empty0 + 8 * s, WARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
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
      const unsigned *x32 = reinterpret_cast<const unsigned *>(xbuf + (size_t)l * K);
      for (int q = ct; q < gpt * 2 * 4 * 8; q += WARPS * 32) {
        const int kc = q / 32, tt = (q / 8) % 4, e = q % 8, j = e / 2, hi = e % 2;
        reinterpret_cast<unsigned *>(xs)[q] = x32[(g0 * 2 + kc) * 32 + 8 * j + 4 * hi + tt];
      }
      for (int gg = cw; gg < gpt; gg += WARPS) {
        const unsigned short *xh = xbuf + (size_t)l * K + (size_t)(g0 + gg) * 128;
        float v = h2f(xh[lane]) + h2f(xh[lane + 32]) + h2f(xh[lane + 64]) + h2f(xh[lane + 96]);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) xsum[gg] = v;
      }
      CBAR();
      float acc[CB][2];
#pragma unroll
      for (int c = 0; c < CB; c++) acc[c][0] = acc[c][1] = 0.f;
      for (int gg = 0; gg < gpt; gg++, i++) {
        const int s = i % S;
        mbar_wait(full0 + 8 * s, (i / S) & 1);
        const unsigned char *st = ring + s * STAGE_BYTES;
        uint4 w[CB][2];
        unsigned zw[CB][2];
        unsigned short sv[CB][2];
#pragma unroll
        for (int c = 0; c < CB; c++) {
          const int cl = cw * CB + c, cc = cl * 16 + g;
#pragma unroll
          for (int h = 0; h < 2; h++) w[c][h] = reinterpret_cast<const uint4 *>(st + cl * 1024 + h * 512)[lane];
          zw[c][0] = reinterpret_cast<const unsigned *>(st + WARPS * CB * 1024 + COLS * 2)[cc / 8];
          zw[c][1] = reinterpret_cast<const unsigned *>(st + WARPS * CB * 1024 + COLS * 2)[(cc + 8) / 8];
          sv[c][0] = reinterpret_cast<const unsigned short *>(st + WARPS * CB * 1024)[cc];
          sv[c][1] = reinterpret_cast<const unsigned short *>(st + WARPS * CB * 1024)[cc + 8];
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty0 + 8 * s);
        float d[CB][4][4];
#pragma unroll
        for (int c = 0; c < CB; c++)
#pragma unroll
          for (int j = 0; j < 4; j++) d[c][j][0] = d[c][j][1] = d[c][j][2] = d[c][j][3] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int kc = gg * 2 + h;
          const uint4 xa = xs[(kc * 4 + t) * 2], xb = xs[(kc * 4 + t) * 2 + 1];
#pragma unroll
          for (int c = 0; c < CB; c++) {
            word_mma(d[c][0], w[c][h].x, 0u, 0u, xa.x, xa.y);
            word_mma(d[c][1], w[c][h].y, 0u, 0u, xa.z, xa.w);
            word_mma(d[c][2], w[c][h].z, 0u, 0u, xb.x, xb.y);
            word_mma(d[c][3], w[c][h].w, 0u, 0u, xb.z, xb.w);
          }
        }
#pragma unroll
        for (int c = 0; c < CB; c++) {
          const int cc = (cw * CB + c) * 16 + g;
          const float D0 = (d[c][0][0] + d[c][1][0]) + (d[c][2][0] + d[c][3][0]);
          const float D2 = (d[c][0][2] + d[c][1][2]) + (d[c][2][2] + d[c][3][2]);
          const float X = xsum[gg];
          const float za = (float)(((zw[c][0] >> ((cc % 8) * 4)) & 15u) + 1u);
          const float zb = (float)(((zw[c][1] >> ((cc % 8) * 4)) & 15u) + 1u);
          acc[c][0] += (D0 - (1024.f + za) * X) * h2f(sv[c][0]);
          acc[c][1] += (D2 * 0.0625f - (64.f + zb) * X) * h2f(sv[c][1]);
        }
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
    kernel.set_shared_memory_config(stages * _stage_bytes(warps, cb) + 96 * 260)
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


def _stage_bytes(warps, cb):
    cols = warps * cb * 16
    return warps * cb * 1024 + cols * 2 + cols // 2


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
                    smem = stages * _stage_bytes(warps, cb) + gpt * 260
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
