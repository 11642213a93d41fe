"""Batch-1 GPTQ Int4 GEMV in CUDA C++, split over K across the CTAs of a thread-block cluster and reduced through
distributed shared memory: an experiment, timed by bench_cluster.py (docs/benchmarks.md, quantization run 11).

Why CUDA and not Triton: the Triton GEMVs (`gptq_gemv`) split K across programs and sum the partials with float32
atomics, an arrival count and a last-program epilogue -- three dependent L2 round trips at the end of every GEMV,
~2 us of the ~5 us each batch-1 GEMV spends above its bandwidth time on an H100 (docs/benchmarks.md). A cluster's
CTAs can read each other's shared memory after one cluster barrier; Triton exposes neither clusters nor
distributed shared memory. The source is compiled at run time by NVRTC through torch (`torch.cuda._compile_kernel`,
a private torch API, present in torch 2.11 and 2.13), so no CUDA toolkit is needed. It includes no
header: the half2 arithmetic, the conversions and the cluster operations are inline PTX.

One cluster = CL CTAs = one column block of BN columns, CTA `rank` taking the rank-th share of the groups. Inside a
CTA, BN/4 threads side by side each hold 4 columns (one 16-byte load per packed row) and TG rows of them take
chunks of RC packed rows in turn (Marlin's unpacking with the zero point folded in, half2 sums per chunk, the scale
applied once per chunk in fp32 -- the arithmetic of `gptq_int4._int4_word_fma`). Each thread keeps D chunks in
flight through its own ring of cp.async slots in shared memory. The CTA sums its TG rows through shared memory, the
cluster barrier publishes each CTA's BN partial sums, and rank r sums columns [r BN/CL, (r+1) BN/CL) over the CL
CTAs and writes them.
"""

from __future__ import annotations

import functools

import torch

# Marlin's unpacking of a packed word into half2 (1024 + q) pairs, and HFMA2 (also used by mma_gemv.py)
UNPACK_PTX = r"""
__device__ __forceinline__ unsigned lo_nib(unsigned w) {
  unsigned d; asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(d) : "r"(w)); return d; }
__device__ __forceinline__ unsigned hi_nib(unsigned w) {
  unsigned d; asm("lop3.b32 %0, %1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(d) : "r"(w)); return d; }
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d; }
"""

SOURCE = UNPACK_PTX + r"""
#define CT (BN / 4)
#define THREADS (CT * TG)
__device__ __forceinline__ float2 h2f(unsigned h) {
  float2 f; asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
                : "=f"(f.x), "=f"(f.y) : "r"(h)); return f; }
__device__ __forceinline__ unsigned short f2out(float v) {
  unsigned short h;
#if OUT_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
  return h; }

// h + sum over the 8 lanes of word w of x_l (q_l - z) / 256 (see gptq_int4._int4_word_fma)
__device__ __forceinline__ unsigned word_fma(unsigned w, uint4 x, unsigned zlo, unsigned zhi, unsigned h) {
  const unsigned c8 = 0x1C001C00u, c12 = 0x0C000C00u;
  unsigned t = w >> 8;
  h = hfma2(hfma2(lo_nib(w), c8, zlo), x.x, h);
  h = hfma2(hfma2(hi_nib(w), c12, zhi), x.y, h);
  h = hfma2(hfma2(lo_nib(t), c8, zlo), x.z, h);
  return hfma2(hfma2(hi_nib(t), c12, zhi), x.w, h); }

__device__ __forceinline__ unsigned get(const uint4 &v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// This CTA's inputs into shared memory as lane pairs, one uint4 per packed row:
// (x0 x1 | x2 x3 | x4 x5 | x6 x7) -> (x0 x4, x1 x5, x2 x6, x3 x7)
__device__ __forceinline__ void stage_x(uint4 *xs, const unsigned short *x, int row0, int nrows, int tid) {
  const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
  for (int i = tid; i < nrows; i += THREADS) {
    uint4 p = x4[row0 + i];
    xs[i] = make_uint4((p.x & 0xFFFFu) | (p.z << 16), (p.x >> 16) | (p.z & 0xFFFF0000u),
                       (p.y & 0xFFFFu) | (p.w << 16), (p.y >> 16) | (p.w & 0xFFFF0000u));
  }
  __syncthreads();
}

__device__ __forceinline__ void finish(const float acc[4], float (*red)[BN], float *part, unsigned short *out,
                                       int tid, int tc, int tg, int rank, int nb) {
  *reinterpret_cast<float4 *>(&red[tg][tc * 4]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  for (int i = tid; i < BN; i += THREADS) {
    float v = 0.f;
#pragma unroll
    for (int t = 0; t < TG; t++) v += red[t][i];
    part[i] = v;
  }
#if CL > 1
  asm volatile("barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;" ::: "memory");
  unsigned base;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(base) : "l"(part));
  for (int i = tid; i < BN / CL; i += THREADS) {
    const int col = rank * (BN / CL) + i;
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < CL; q++) {
      unsigned ra; float pv;
      asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(base + col * 4), "r"(q));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(pv) : "r"(ra));
      v += pv;
    }
    out[nb * BN + col] = f2out(v);
  }
  asm volatile("barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __syncthreads();
  for (int i = tid; i < BN; i += THREADS) out[nb * BN + i] = f2out(part[i]);
#endif
}

__device__ __forceinline__ unsigned smem_u32(const void *p) {
  unsigned a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a; }

// Chunk c (if < nch) of this thread into ring slot k: RC words, then its group's 4 scales and packed zeros; one
// commit group either way, so cp.async.wait_group counts slots.
__device__ __forceinline__ void issue_chunk(uint4 *ring, uint2 *sz, const uint4 *src, const unsigned *qz,
                                            const uint2 *sc, int k, int c, int nch, int gb, int N, int n0, int tid) {
  if (c < nch) {
#pragma unroll
    for (int r = 0; r < RC; r++)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::
                   "r"(smem_u32(&ring[(k * RC + r) * THREADS + tid])), "l"(src + (size_t)(c * RC + r) * (N / 4)));
    const int g = gb + c * RC / 16;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::
                 "r"(smem_u32(&sz[(k * 2) * THREADS + tid])), "l"(sc + ((size_t)g * N + n0) / 4));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::
                 "r"(smem_u32(&sz[(k * 2 + 1) * THREADS + tid])), "l"(qz + (size_t)g * (N / 8) + n0 / 8));
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Each thread streams its chunks through a private ring of D slots in shared memory (cp.async, 16 bytes a row):
// D chunks in flight per thread without holding them in registers. (Loading the next chunk into registers instead
// measured 1-17% slower at every shape, docs/benchmarks.md run 11.)
extern "C" __global__ void
#if CL > 1
__cluster_dims__(CL, 1, 1)
#endif
__launch_bounds__(THREADS) gptq_int4_gemv(const unsigned short *__restrict__ x, const uint4 *__restrict__ qw,
                                                const unsigned *__restrict__ qz, const uint2 *__restrict__ sc,
                                                unsigned short *__restrict__ out, int N, int K) {
  extern __shared__ uint4 ring[];          // [D][RC][THREADS] words, then [D][THREADS] (scale, zero) pairs
  __shared__ uint4 xs[GPR * 16];
  __shared__ float red[TG][BN];
  __shared__ float part[BN];
  const int tid = threadIdx.x, tc = tid % CT, tg = tid / CT;
  const int rank = blockIdx.x % CL, nb = blockIdx.x / CL;
  const int G = K / 128, gb = rank * GPR, ge = min(G, gb + GPR);
  const int nrows = max(ge - gb, 0) * 16, nch = nrows / RC, row0 = gb * 16;
  const int n0 = nb * BN + tc * 4;
  uint2 *sz = reinterpret_cast<uint2 *>(ring + D * RC * THREADS);
  const uint4 *src = qw + (size_t)row0 * (N / 4) + n0 / 4;
#pragma unroll
  for (int k = 0; k < D; k++) issue_chunk(ring, sz, src, qz, sc, k, tg + k * TG, nch, gb, N, n0, tid);
  stage_x(xs, x, row0, nrows, tid);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0;; i++) {
    const int c = tg + i * TG;
    if (c >= nch) break;
    const int k = i % D;
    asm volatile("cp.async.wait_group %0;" :: "n"(D - 1) : "memory");
    const uint2 sv = sz[(k * 2) * THREADS + tid];
    const unsigned zw = sz[(k * 2 + 1) * THREADS + tid].x;
    const float2 s01 = h2f(sv.x), s23 = h2f(sv.y);
    const float s[4] = {s01.x, s01.y, s23.x, s23.y};
    unsigned zlo[4], zhi[4], h0[4], h1[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned z = ((zw >> (((n0 + j) % 8) * 4)) & 15u) + 1u;
      zlo[j] = (z | 0x4400u) ^ 0x8000u; zhi[j] = ((z << 4) | 0x3400u) ^ 0x8000u;
      zlo[j] |= zlo[j] << 16; zhi[j] |= zhi[j] << 16;
      h0[j] = 0; h1[j] = 0;
    }
#pragma unroll
    for (int r = 0; r < RC; r += 2) {
      const uint4 w0 = ring[(k * RC + r) * THREADS + tid], w1 = ring[(k * RC + r + 1) * THREADS + tid];
      const uint4 xa = xs[c * RC + r], xb = xs[c * RC + r + 1];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        h0[j] = word_fma(get(w0, j), xa, zlo[j], zhi[j], h0[j]);
        h1[j] = word_fma(get(w1, j), xb, zlo[j], zhi[j], h1[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 a = h2f(h0[j]), b = h2f(h1[j]);
      acc[j] += 256.f * s[j] * ((a.x + a.y) + (b.x + b.y));
    }
    issue_chunk(ring, sz, src, qz, sc, k, c + D * TG, nch, gb, N, n0, tid);
  }
  finish(acc, red, part, out, tid, tc, tg, rank, nb);
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(bn: int, cl: int, tg: int, rc: int, depth: int, gpr: int, bf16: bool):
    defines = f"#define BN {bn}\n#define CL {cl}\n#define TG {tg}\n#define RC {rc}\n#define GPR {gpr}\n" \
              f"#define OUT_BF16 {int(bf16)}\n#define D {depth}\n"
    kernel = torch.cuda._compile_kernel(defines + SOURCE, "gptq_int4_gemv")
    kernel.set_shared_memory_config(_ring_bytes(bn, tg, rc, depth) + gpr * 256 + tg * bn * 4 + bn * 4)
    return kernel


def _ring_bytes(bn, tg, rc, depth):
    return depth * (rc * 16 + 16) * (bn // 4) * tg


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              config: tuple, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] (fp16; other dtypes are converted) @ GPTQ Int4 (group 128, official layout) -> [1, N] in
    out_dtype (x's dtype by default). config: (BN, CL, TG, RC)."""
    bn, cl, tg, rc, depth = config
    K, N = x.shape[-1], qweight.shape[1]
    assert K % 128 == 0 and N % bn == 0 and bn % (4 * cl) == 0 and 16 % rc == 0 and rc % 2 == 0 and depth > 0, \
        (K, N, config)
    out_dtype = out_dtype or x.dtype
    x16 = x if x.dtype == torch.float16 else x.half()
    gpr = -(-(K // 128) // cl)
    out = torch.empty((1, N), device=x.device, dtype=out_dtype)
    _kernel(bn, cl, tg, rc, depth, gpr, out_dtype == torch.bfloat16)(
        grid=(N // bn * cl, 1, 1), block=(bn // 4 * tg, 1, 1), shared_mem=_ring_bytes(bn, tg, rc, depth),
        args=[x16.contiguous(), qweight, qzeros, scales, out, N, K])
    return out
