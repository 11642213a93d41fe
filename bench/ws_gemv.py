"""Batch-1 GPTQ Int4 GEMV on the tensor cores, warp-specialised, in CUDA C++: an experiment (docs/benchmarks.md,
quantization run 16), timed by bench_mma.py (--ws), bench_mma_engine.py (--ws) and, as a persistent chain, by
bench_chain.py. One thread of a producer warp streams each group's weights, scales and zeros for the CTA's
columns into a ring of shared-memory stages, one 1-D bulk copy (cp.async.bulk) per stage from a block laid out
contiguously at load time (`repack_ws`), counted by the stage's mbarrier; it never waits on the arithmetic. The
consumer warps sum on the tensor cores as `mma_gemv` does (mma_gemv.py: fragment order, MATH 2). 8% faster than the
fused Triton GEMVs alone over a layer's four GEMVs; +0.5% tok/s as mlp c_proj in the engine, -1.5% as attn c_proj.
"""

from __future__ import annotations

import functools

import torch

from mma_gemv import MAXG, _common_source, launch_pdl, repack_fragments

WS_COMMON = r"""
// The warp-specialised kernels' pieces (mma_gemv_ws here, chain_ws in bench_chain.py): a ring of S stages in shared
// memory, each one `repack_ws` block (the weights, scales and zeros of a group for the CTA's WARPS * CB column
// blocks) landed by one 1-D bulk copy (cp.async.bulk) and counted by the stage's mbarrier; consumer warps 1..WARPS.
#define WS_THREADS ((WARPS + 1) * 32)
#define COLS (WARPS * CB * 16)
#define STAGE_W (WARPS * CB * 1024)
#define STAGE_S (COLS * 2)
#define STAGE_Z (COLS / 2)
#define STAGE_BYTES (STAGE_W + STAGE_S + STAGE_Z)
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

// full[s] (1 arrival + the copy's bytes) and empty[s] (one arrival per consumer warp) for every stage
__device__ __forceinline__ void init_ring(unsigned full0, unsigned empty0) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; s++) { mbar_init(full0 + 8 * s, 1); mbar_init(empty0 + 8 * s, WARPS); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
}

// Groups [g0, g0 + ng) of the inputs x into shared memory in fragment order, and (MATH 2) each group's sum
__device__ __forceinline__ void stage_inputs(uint4 *xs, float *xsum, const unsigned *x32, int g0, int ng, int ct,
                                             int cw, int lane) {
  for (int q = ct; q < ng * 2 * 4 * 8; q += WARPS * 32) {
    const int kc = q / 32, tt = (q / 8) % 4, e = q % 8, j = e / 2, hi = e % 2;
    reinterpret_cast<unsigned *>(xs)[q] = x32[(g0 * 2 + kc) * 32 + 8 * j + 4 * hi + tt];
  }
#if MATH == 2
  for (int gg = cw; gg < ng; gg += WARPS) {
    const unsigned short *xh = reinterpret_cast<const unsigned short *>(x32) + (size_t)(g0 + gg) * 128;
    float v = h2f(xh[lane]) + h2f(xh[lane + 32]) + h2f(xh[lane + 64]) + h2f(xh[lane + 96]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) xsum[gg] = v;
  }
#endif
}

// Consumer warp cw's share of stage st (local group gl of the staged inputs): its words into registers, the stage
// released (empty_bar), then the sums added into acc (columns g and g + 8 of each of its CB column blocks)
__device__ __forceinline__ void consume_stage(float acc[CB][2], const unsigned char *st, unsigned empty_bar,
                                              const uint4 *xs, const float *xsum, int gl, int cw, int lane) {
  const int g = lane / 4, t = lane % 4;
  uint4 w[CB][2];
  unsigned zw[CB][2];
  unsigned short sv[CB][2];
#pragma unroll
  for (int c = 0; c < CB; c++) {
    const int cl = cw * CB + c, cc = cl * 16 + g;  // column inside the CTA
#pragma unroll
    for (int h = 0; h < 2; h++) w[c][h] = reinterpret_cast<const uint4 *>(st + cl * 1024 + h * 512)[lane];
    zw[c][0] = reinterpret_cast<const unsigned *>(st + STAGE_W + STAGE_S)[cc / 8];
    zw[c][1] = reinterpret_cast<const unsigned *>(st + STAGE_W + STAGE_S)[(cc + 8) / 8];
    sv[c][0] = reinterpret_cast<const unsigned short *>(st + STAGE_W)[cc];
    sv[c][1] = reinterpret_cast<const unsigned short *>(st + STAGE_W)[cc + 8];
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(empty_bar);
  float d[CB][4][4];
#pragma unroll
  for (int c = 0; c < CB; c++)
#pragma unroll
    for (int j = 0; j < 4; j++) d[c][j][0] = d[c][j][1] = d[c][j][2] = d[c][j][3] = 0.f;
  unsigned zlo[CB], zhi[CB];
#pragma unroll
  for (int c = 0; c < CB; c++) {
    const int cc = (cw * CB + c) * 16 + g;
    unsigned za = ((zw[c][0] >> ((cc % 8) * 4)) & 15u) + 1u, zb = ((zw[c][1] >> ((cc % 8) * 4)) & 15u) + 1u;
    za = (za | 0x4400u) ^ 0x8000u;
    zb = ((zb << 4) | 0x3400u) ^ 0x8000u;
    zlo[c] = za | (za << 16);
    zhi[c] = zb | (zb << 16);
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int kc = gl * 2 + h;
    const uint4 xa = xs[(kc * 4 + t) * 2], xb = xs[(kc * 4 + t) * 2 + 1];
#pragma unroll
    for (int c = 0; c < CB; c++) {
      word_mma(d[c][0], w[c][h].x, zlo[c], zhi[c], xa.x, xa.y);
      word_mma(d[c][1], w[c][h].y, zlo[c], zhi[c], xa.z, xa.w);
      word_mma(d[c][2], w[c][h].z, zlo[c], zhi[c], xb.x, xb.y);
      word_mma(d[c][3], w[c][h].w, zlo[c], zhi[c], xb.z, xb.w);
    }
  }
#pragma unroll
  for (int c = 0; c < CB; c++) {
    const float D0 = (d[c][0][0] + d[c][1][0]) + (d[c][2][0] + d[c][3][0]);
    const float D2 = (d[c][0][2] + d[c][1][2]) + (d[c][2][2] + d[c][3][2]);
#if MATH == 2
    const int cc = (cw * CB + c) * 16 + g;
    const float X = xsum[gl];
    const float za = (float)(((zw[c][0] >> ((cc % 8) * 4)) & 15u) + 1u);
    const float zb = (float)(((zw[c][1] >> ((cc % 8) * 4)) & 15u) + 1u);
    acc[c][0] += (D0 - (1024.f + za) * X) * h2f(sv[c][0]);
    acc[c][1] += (D2 * 0.0625f - (64.f + zb) * X) * h2f(sv[c][1]);
#else
    acc[c][0] += D0 * 256.f * h2f(sv[c][0]);
    acc[c][1] += D2 * 256.f * h2f(sv[c][1]);
#endif
  }
}
"""

WS_SOURCE = WS_COMMON + r"""
// Warp-specialised GEMV: one thread of warp 0 streams the CTA's groups into the ring, never waiting on the
// arithmetic, only on a stage being released, and with PDL never for the kernel before; the consumer warps sum.
// MINB: CTAs per SM the registers must allow (so that the next kernel's CTAs fit beside this one's); TRIG 1: the next
// kernel may launch as soon as the consumers start, 0: after the first group is summed
extern "C" __global__ void __launch_bounds__(WS_THREADS, MINB) mma_gemv_ws(const unsigned *__restrict__ x32,
    const unsigned char *__restrict__ B, float *__restrict__ out, int N, int K, int gpt,
    const unsigned short *__restrict__ res, unsigned short *__restrict__ outh, unsigned *__restrict__ cnt) {
  // [S][STAGE_BYTES] (weights, scales, zeros), then the inputs in fragment order [gpt * 16] uint4, then xsum [gpt]
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long bars[2 * S];  // full[S], then empty[S]
  uint4 *xs = reinterpret_cast<uint4 *>(ring + S * STAGE_BYTES);
  float *xsum = reinterpret_cast<float *>(xs + gpt * 16);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int G = K / 128;
  const int g0 = blockIdx.y * gpt, g1 = min(G, g0 + gpt), ng = g1 - g0;
  const int col0 = blockIdx.x * COLS;
  const unsigned full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[S]), ring0 = smem_u32(ring);
  init_ring(full0, empty0);
  if (warp == 0) {  // producer
    if (lane == 0) {
      for (int i = 0; i < ng; i++) {
        const int s = i % S, gi = g0 + i;
        if (i >= S) mbar_wait(empty0 + 8 * s, ((i / S) - 1) & 1);
        const unsigned st = ring0 + s * STAGE_BYTES, bar = full0 + 8 * s;
        mbar_expect_tx(bar, STAGE_BYTES);
        bulk_g2s(st, B + ((size_t)blockIdx.x * G + gi) * STAGE_BYTES, STAGE_BYTES, bar);
      }
    }
    return;
  }
  // consumers
  const int ct = threadIdx.x - 32, cw = warp - 1, g = lane / 4, t = lane % 4;
#if PDL
#if TRIG
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  stage_inputs(xs, xsum, x32, g0, ng, ct, cw, lane);
  CBAR();
  float acc[CB][2];
#pragma unroll
  for (int c = 0; c < CB; c++) acc[c][0] = acc[c][1] = 0.f;
  for (int i = 0; i < ng; i++) {
    const int s = i % S;
    mbar_wait(full0 + 8 * s, (i / S) & 1);
    consume_stage(acc, ring + s * STAGE_BYTES, empty0 + 8 * s, xs, xsum, i, cw, lane);
#if PDL && !TRIG
    if (i == 0) asm volatile("griddepcontrol.launch_dependents;");
#endif
  }
  if (t == 0) {
#pragma unroll
    for (int c = 0; c < CB; c++) {
      const int col = col0 + (cw * CB + c) * 16 + g;
      atomicAdd(out + col, acc[c][0]);
      atomicAdd(out + col + 8, acc[c][1]);
    }
  }
#if EPI  // out: a float32 workspace kept at zero; the last CTA of the column run writes fp16(fp16(sum) + res)
  __shared__ int last;
  __threadfence();
  CBAR();
  if (ct == 0) last = atomicAdd(cnt + blockIdx.x, 1u) == gridDim.y - 1;
  CBAR();
  if (last) {
    __threadfence();
    for (int i = ct; i < COLS; i += WARPS * 32) {
      const float v = atomicExch(out + col0 + i, 0.f);
      outh[col0 + i] = f2h(h2f(f2h(v)) + h2f(res[col0 + i]));
    }
    if (ct == 0) cnt[blockIdx.x] = 0;
  }
#endif
}
"""



@functools.lru_cache(maxsize=None)
def _ws_kernel(warps: int, cb: int, stages: int, math: int, pdl: int, epi: int = 0, minb: int = 1, trig: int = 0):
    defines = f"#define WARPS {warps}\n#define CB {cb}\n#define S {stages}\n#define MAXG {MAXG}\n" \
              f"#define MATH {math}\n#define PDL {pdl}\n#define EPI {epi}\n#define MINB {minb}\n#define TRIG {trig}\n"
    kernel = torch.cuda._compile_kernel(defines + _common_source() + WS_SOURCE, "mma_gemv_ws")
    kernel.set_shared_memory_config(_ws_smem(warps, cb, stages, MAXG))
    return kernel


def _ws_stage_bytes(warps, cb):
    cols = warps * cb * 16
    return warps * cb * 1024 + cols * 2 + cols // 2


def _ws_smem(warps, cb, stages, gpt):
    return stages * _ws_stage_bytes(warps, cb) + gpt * (256 + 4)


def repack_ws(frags: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """`repack_fragments`' words with the scales and packed zeros, as one contiguous block per (run of `cols`
    columns, group): [N / cols, G, cols / 16 * 1024 + cols * 2 + cols / 2] bytes (the warp-specialised kernel's
    stage: one bulk copy each)."""
    nb, kc = frags.shape[0], frags.shape[1]
    G, per = kc // 2, cols // 16
    w = frags.view(nb // per, per, G, 2 * 32 * 4).permute(0, 2, 1, 3).reshape(nb // per, G, -1)
    sc = scales.view(G, nb // per, cols).permute(1, 0, 2)
    qz = qzeros.view(G, nb // per, cols // 8).permute(1, 0, 2)
    return torch.cat([w.contiguous().view(torch.uint8), sc.contiguous().view(torch.uint8),
                      qz.contiguous().view(torch.uint8)], dim=2).contiguous()


def mma_gemv_ws(x: torch.Tensor, blob: torch.Tensor, out: torch.Tensor, config: tuple) -> torch.Tensor:
    """`mma_gemv` by the warp-specialised kernel (WS_SOURCE) on `repack_ws`' blocks (cols = 16 WARPS CB).
    config: (WARPS, CB, STAGES, SPLIT, MATH): WARPS consumer warps of CB column blocks each plus one producer warp,
    a ring of STAGES groups."""
    warps, cb, stages, split, math = config
    cols = 16 * cb * warps
    n, G = blob.shape[0] * cols, blob.shape[1]
    k = G * 128
    gpt = -(-G // split)
    assert blob.shape[2] == _ws_stage_bytes(warps, cb) and gpt <= MAXG and x.dtype == torch.float16, (n, k, config)
    _ws_kernel(warps, cb, stages, math, 0)(grid=(n // cols, -(-G // gpt), 1), block=(32 * (warps + 1), 1, 1),
                                           shared_mem=_ws_smem(warps, cb, stages, gpt),
                                           args=[x.contiguous(), blob, out, n, k, gpt, out, out, out])
    return out



class MmaResidualWS:
    """`MmaResidual` by the warp-specialised kernel (EPI and PDL), on `repack_ws` blocks."""

    def __init__(self, layer, config=(4, 2, 4, 12, 2)):
        warps, cb, stages, split, math, *launch = config  # launch: (MINB, TRIG), see WS_SOURCE
        self.cols = 16 * cb * warps
        self.blob = repack_ws(repack_fragments(layer.qweight), layer.qzeros, layer.scales, self.cols)
        self.n, self.k = layer.out_features, layer.in_features
        G = self.k // 128
        self.gpt = -(-G // split)
        self.grid = (self.n // self.cols, -(-G // self.gpt), 1)
        self.block = (32 * (warps + 1), 1, 1)
        self.smem = _ws_smem(warps, cb, stages, self.gpt)
        self.kernel = _ws_kernel(warps, cb, stages, math, 1, 1, *launch)
        self.ws = torch.zeros(self.n, device=layer.qweight.device, dtype=torch.float32)
        self.cnt = torch.zeros(self.grid[0], device=layer.qweight.device, dtype=torch.int32)

    def __call__(self, x, residual):
        out = torch.empty((1, self.n), device=x.device, dtype=torch.float16)
        launch_pdl(self.kernel, self.grid, self.block, [x.reshape(-1), self.blob, self.ws, self.n, self.k, self.gpt,
                                                         residual.reshape(-1), out, self.cnt], self.smem)
        return out
