"""Batch-1 GPTQ Int4 GEMV on the tensor cores, in CUDA C++: an experiment, timed by bench_mma.py and, as every
layer's mlp c_proj or attn c_proj in the engine's fused decode, by bench_mma_engine.py (docs/benchmarks.md,
quantization run 16): correct, as fast as the fused Triton GEMV, not faster. Its warp-specialised sibling is
ws_gemv.py; `launch_pdl` launches either with programmatic dependent launch.

Why: in the fused decode (qwenlm.kernels.gptq_fused) the Triton GEMVs issue ~19 instructions per packed word (13
of them Marlin's unpacking and the half2 products, the rest regrouping inputs, summing rows and per-tile
bookkeeping) with 2 warps per scheduler. Here the products and sums go to the tensor cores: a warp's
mma.m16n8k16 takes 16 output columns x 16 inputs, and each lane's A fragment is exactly 8 four-bit weights -- one
packed word -- once the words are repacked at load time into fragment order (`repack_fragments`). Per word that
leaves the unpacking (4 LOP3, 1 shift, 4 HFMA2 folding in the zero point) and one HMMA; MATH 2 drops the 4 HFMA2
too: the raw halves 1024 + q go into the mma and each group's sums are corrected once per column by the sum of
its inputs.

The B fragment is the input, the same in all 8 columns, so every column of D holds the result; the input order
inside the 16 is the fragment's own (lane t of a group of 4 takes inputs 2t, 2t+1, 2t+8, 2t+9), read as pairs.
Compiled at run time by NVRTC through torch (`torch.cuda._compile_kernel`, as `cluster_gemv.py`); inline PTX only.
EPI adds the fused kernel's residual epilogue and programmatic dependent launch (`launch_pdl`: torch's launcher
takes no launch attributes, so cuLaunchKernelEx through ctypes).

Layout of the repacked words: [N/16, K/64, 32 lanes, 4 mma steps] int32, so a warp streams 512 contiguous bytes
per 16 columns x 64 inputs and each lane loads one 16-byte vector. Word (lane L = 4g + t, step j) of column block
c and input block k0 = 64 kc + 16 j holds, in nibbles 0..7: W[k0+2t, c+g], W[k0+2t, c+g+8], W[k0+2t+8, c+g],
W[k0+2t+8, c+g+8], W[k0+2t+1, c+g], W[k0+2t+1, c+g+8], W[k0+2t+9, c+g], W[k0+2t+9, c+g+8]: Marlin's
(w & 0x000F000F) gives the half2 (nibble 0, nibble 4) = a0, (w & 0x00F000F0) gives a1, and w >> 8 gives a2, a3.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cluster_gemv import UNPACK_PTX

SOURCE = UNPACK_PTX + r"""
#define THREADS (WARPS * 32)

__device__ __forceinline__ float h2f(unsigned short h) {
  float f; asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) {
  unsigned short h; asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f)); return h; }

// d += A(word w: (q - z)/256 for columns g (zlo) and g + 8 (zhi)) x B(b0, b1)
__device__ __forceinline__ void word_mma(float d[4], unsigned w, unsigned zlo, unsigned zhi, unsigned b0,
                                         unsigned b1) {
#if !MATH  // loads only: one XOR per word keeps the loads alive
  d[0] = __int_as_float(__float_as_int(d[0]) ^ w);
  return;
#endif
  const unsigned t = w >> 8;
#if MATH == 2  // the raw halves: 1024 + q for column g, 1024 + 16 q for column g + 8 (corrected per group)
  const unsigned a0 = lo_nib(w), a1 = hi_nib(w), a2 = lo_nib(t), a3 = hi_nib(t);
#else
  const unsigned c8 = 0x1C001C00u, c12 = 0x0C000C00u;
  const unsigned a0 = hfma2(lo_nib(w), c8, zlo), a1 = hfma2(hi_nib(w), c12, zhi);
  const unsigned a2 = hfma2(lo_nib(t), c8, zlo), a3 = hfma2(hi_nib(t), c12, zhi);
#endif
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned get(const uint4 &v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

struct Group {        // one lane's share of a quantization group (2 x 64 inputs) for its CB column blocks
  uint4 w[CB][2];     // packed words, 4 mma steps each
  unsigned zw[CB][2]; // packed zeros of columns g and g + 8
  unsigned short s[CB][2];
};

__device__ __forceinline__ void load_group(Group &q, const uint4 *P, const unsigned *qz, const unsigned short *sc,
                                           int gi, int cb0, int KC, int N, int lane) {
  const int g = lane / 4;
#pragma unroll
  for (int c = 0; c < CB; c++) {
    const int cb = cb0 + c, col = cb * 16 + g;
#pragma unroll
    for (int h = 0; h < 2; h++) q.w[c][h] = P[((size_t)cb * KC + gi * 2 + h) * 32 + lane];
    q.zw[c][0] = qz[(size_t)gi * (N / 8) + col / 8];
    q.zw[c][1] = qz[(size_t)gi * (N / 8) + (col + 8) / 8];
    q.s[c][0] = sc[(size_t)gi * N + col];
    q.s[c][1] = sc[(size_t)gi * N + col + 8];
  }
}

// One CTA = WARPS warps x CB column blocks of 16 each, over groups [g0, g1) of the inputs; partial sums added into
// out (float32, zeroed by the caller) with atomics. EPI: out is a float32 workspace kept at zero between calls, the
// last CTA of a column range to arrive (cnt) writes outh = fp16(fp16(sum) + res) and re-arms the workspace, as the
// fused Triton GEMV's residual epilogue does; with programmatic dependent launch, the weights of the first DEPTH
// groups are loaded before waiting for the kernel before (griddepcontrol.wait), and the next kernel may launch
// once the first group is summed.
extern "C" __global__ void __launch_bounds__(THREADS) mma_gemv(const unsigned *__restrict__ x32,
    const uint4 *__restrict__ P, const unsigned *__restrict__ qz, const unsigned short *__restrict__ sc,
    float *__restrict__ out, int N, int K, int gpt, const unsigned short *__restrict__ res,
    unsigned short *__restrict__ outh, unsigned *__restrict__ cnt) {
  __shared__ uint4 xs[MAXG * 2 * 4 * 2];  // per 64-input block and lane-in-group t: (b0, b1) of its 4 steps
  __shared__ float xsum[MAXG];             // MATH 2: the sum of each group's inputs
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int G = K / 128, KC = K / 64;
  const int g0 = blockIdx.y * gpt, g1 = min(G, g0 + gpt);
  const int cb0 = (blockIdx.x * WARPS + warp) * CB;
  Group ring[DEPTH];
#pragma unroll
  for (int s = 0; s < DEPTH; s++)
    if (g0 + s < g1) load_group(ring[s], P, qz, sc, g0 + s, cb0, KC, N, lane);
#if EPI
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  // the inputs of this CTA's groups in fragment order: xs[(kc * 4 + t) * 2 + {0, 1}] = words
  // (x32[32 kc + 8 j + t], x32[32 kc + 8 j + 4 + t]) for j = 0..3
  for (int i = threadIdx.x; i < (g1 - g0) * 2 * 4 * 8; i += THREADS) {
    const int kc = i / 32, tt = (i / 8) % 4, e = i % 8, j = e / 2, hi = e % 2;
    reinterpret_cast<unsigned *>(xs)[i] = x32[(g0 * 2 + kc) * 32 + 8 * j + 4 * hi + tt];
  }
#if MATH == 2
  for (int gg = warp; gg < g1 - g0; gg += WARPS) {
    const unsigned short *xh = reinterpret_cast<const unsigned short *>(x32) + (size_t)(g0 + gg) * 128;
    float v = h2f(xh[lane]) + h2f(xh[lane + 32]) + h2f(xh[lane + 64]) + h2f(xh[lane + 96]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) xsum[gg] = v;
  }
#endif
  __syncthreads();
  float acc[CB][2];
#pragma unroll
  for (int c = 0; c < CB; c++) acc[c][0] = acc[c][1] = 0.f;
  for (int gb = g0; gb < g1; gb += DEPTH) {
#pragma unroll
    for (int s = 0; s < DEPTH; s++) {
      const int gi = gb + s;
      if (gi < g1) {
        Group &q = ring[s];
        // one accumulator per mma step j: 4 independent chains of 2 mmas (an mma's latency is ~30 cycles)
        float d[CB][4][4];
#pragma unroll
        for (int c = 0; c < CB; c++)
#pragma unroll
          for (int j = 0; j < 4; j++) d[c][j][0] = d[c][j][1] = d[c][j][2] = d[c][j][3] = 0.f;
        unsigned zlo[CB], zhi[CB];
#pragma unroll
        for (int c = 0; c < CB && MATH != 2; c++) {
          const int col = (cb0 + c) * 16 + g;
          unsigned za = ((q.zw[c][0] >> ((col % 8) * 4)) & 15u) + 1u;
          unsigned zb = ((q.zw[c][1] >> (((col + 8) % 8) * 4)) & 15u) + 1u;
          za = (za | 0x4400u) ^ 0x8000u;
          zb = ((zb << 4) | 0x3400u) ^ 0x8000u;
          zlo[c] = za | (za << 16);
          zhi[c] = zb | (zb << 16);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int kc = (gi - g0) * 2 + h;
          const uint4 xa = xs[(kc * 4 + t) * 2], xb = xs[(kc * 4 + t) * 2 + 1];
#pragma unroll
          for (int c = 0; c < CB; c++) {
            word_mma(d[c][0], q.w[c][h].x, zlo[c], zhi[c], xa.x, xa.y);
            word_mma(d[c][1], q.w[c][h].y, zlo[c], zhi[c], xa.z, xa.w);
            word_mma(d[c][2], q.w[c][h].z, zlo[c], zhi[c], xb.x, xb.y);
            word_mma(d[c][3], q.w[c][h].w, zlo[c], zhi[c], xb.z, xb.w);
          }
        }
#pragma unroll
        for (int c = 0; c < CB; c++) {
          const float D0 = (d[c][0][0] + d[c][1][0]) + (d[c][2][0] + d[c][3][0]);
          const float D2 = (d[c][0][2] + d[c][1][2]) + (d[c][2][2] + d[c][3][2]);
#if MATH == 2
          const int col = (cb0 + c) * 16 + g;
          const float X = xsum[gi - g0];
          const float za = (float)(((q.zw[c][0] >> ((col % 8) * 4)) & 15u) + 1u);
          const float zb = (float)(((q.zw[c][1] >> (((col + 8) % 8) * 4)) & 15u) + 1u);
          acc[c][0] += (D0 - (1024.f + za) * X) * h2f(q.s[c][0]);
          acc[c][1] += (D2 * 0.0625f - (64.f + zb) * X) * h2f(q.s[c][1]);
#else
          acc[c][0] += D0 * 256.f * h2f(q.s[c][0]);
          acc[c][1] += D2 * 256.f * h2f(q.s[c][1]);
#endif
        }
        if (gi + DEPTH < g1) load_group(ring[s], P, qz, sc, gi + DEPTH, cb0, KC, N, lane);
#if EPI
        if (gi == g0) asm volatile("griddepcontrol.launch_dependents;");
#endif
      }
    }
  }
  if (t == 0) {
#pragma unroll
    for (int c = 0; c < CB; c++) {
      const int col = (cb0 + c) * 16 + g;
      atomicAdd(out + col, acc[c][0]);
      atomicAdd(out + col + 8, acc[c][1]);
    }
  }
#if EPI
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    for (int i = threadIdx.x; i < WARPS * CB * 16; i += THREADS) {
      const int col = blockIdx.x * WARPS * CB * 16 + i;
      const float v = atomicExch(out + col, 0.f);
      outh[col] = f2h(h2f(f2h(v)) + h2f(res[col]));
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
  }
#endif
}
"""


def repack_fragments(qweight: torch.Tensor) -> torch.Tensor:
    """Official Int4 qweight [K/8, N] int32 -> the words in mma fragment order [N/16, K/64, 32, 4] int32 (module
    docstring). Same size: a permutation of the 4-bit values."""
    k8, n = qweight.shape
    k, dev = k8 * 8, qweight.device
    shifts = torch.arange(0, 32, 4, device=dev, dtype=torch.int32)
    w = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 15).to(torch.uint8).reshape(k, n)  # W[k, n]
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    dk = torch.tensor([0, 0, 8, 8, 1, 1, 9, 9], device=dev)  # nibble -> input offset from 2t
    dc = torch.tensor([0, 8, 0, 8, 0, 8, 0, 8], device=dev)  # nibble -> column offset from g
    kc = torch.arange(k // 64, device=dev)
    j = torch.arange(4, device=dev)
    kidx = (kc[:, None, None, None] * 64 + j[None, None, :, None] * 16 + 2 * t[None, :, None, None]
            + dk[None, None, None, :])  # [K/64, 32, 4, 8]
    cb = torch.arange(n // 16, device=dev)
    nidx = cb[:, None, None] * 16 + g[None, :, None] + dc[None, None, :]  # [N/16, 32, 8]
    out = torch.empty((n // 16, k // 64, 32, 4), device=dev, dtype=torch.int32)
    for c0 in range(0, n // 16, 64):  # in slices: the gathered nibbles take a byte each
        vals = w[kidx[None], nidx[c0:c0 + 64, None, :, None, :]].to(torch.int32)  # [c, K/64, 32, 4, 8]
        out[c0:c0 + 64] = (vals << shifts).sum(-1, dtype=torch.int32)
    return out


def fragment_check(k: int = 256, n: int = 64) -> float:
    """The mma's arithmetic on `repack_fragments`' words, emulated in torch on the CPU (A and B fragments placed by
    the PTX layout of mma.m16n8k16, D = A @ B), against W^T x: the largest difference (0 when the layout is
    right, up to float64 rounding)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 16, (k, n), generator=gen)
    qw = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        qw |= w[i::8] << (4 * i)
    frags = repack_fragments(((qw + 2**31) % 2**32 - 2**31).to(torch.int32))
    x = torch.randn(k, generator=gen, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    out = torch.zeros(n, dtype=torch.float64)
    for cb in range(n // 16):
        for kc in range(k // 64):
            for j in range(4):
                words = frags[cb, kc, :, j].to(torch.int64) & 0xFFFFFFFF
                nib = [(words >> (4 * i)) & 15 for i in range(8)]
                a = torch.zeros(16, 16, dtype=torch.float64)
                b = torch.zeros(16, 8, dtype=torch.float64)
                for r0, c0, lo, hi in ((0, 0, 0, 4), (8, 0, 1, 5), (0, 8, 2, 6), (8, 8, 3, 7)):  # a0, a1, a2, a3
                    a[g + r0, 2 * t + c0] = nib[lo].double()
                    a[g + r0, 2 * t + c0 + 1] = nib[hi].double()
                k0 = kc * 64 + 16 * j
                for c0 in (0, 8):  # b0, b1: rows 2t, 2t + 1 (+ 8) of column g
                    b[2 * t + c0, g] = x[k0 + 2 * t + c0]
                    b[2 * t + c0 + 1, g] = x[k0 + 2 * t + c0 + 1]
                out[cb * 16:(cb + 1) * 16] += (a @ b)[:, 0]
    return (out - w.double().T @ x).abs().max().item()


MAXG = 96  # groups of 128 inputs a CTA may take (K up to 12,288 in one CTA)


@functools.lru_cache(maxsize=None)
def _kernel(warps: int, cb: int, depth: int, math: int = 1, epi: int = 0):
    defines = f"#define WARPS {warps}\n#define CB {cb}\n#define DEPTH {depth}\n#define MAXG {MAXG}\n" \
              f"#define MATH {math}\n#define EPI {epi}\n"
    return torch.cuda._compile_kernel(defines + SOURCE, "mma_gemv")


def _common_source() -> str:
    """SOURCE's device helpers (everything before its first kernel's comment)."""
    return SOURCE[:SOURCE.index("__device__ __forceinline__ unsigned get(")]


def mma_gemv(x: torch.Tensor, frags: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
             config: tuple) -> torch.Tensor:
    """out [N] float32 (zeroed by the caller) += x [1, K] fp16 @ the Int4 weights (`repack_fragments` of the
    official qweight, group 128). config: (WARPS, CB, DEPTH, SPLIT[, MATH]): CTAs of WARPS warps x CB column
    blocks of 16, DEPTH groups in flight per lane, the inputs split over SPLIT CTAs; MATH 0: the loads only, 2: the
    raw halves 1024 + q (1024 + 16 q for the fragment's second 8 columns) into the mma, with no conversion per
    word, corrected once per group and column by the group's input sum."""
    warps, cb, depth, split, *math = config
    n, k = frags.shape[0] * 16, frags.shape[1] * 64
    G = k // 128
    gpt = -(-G // split)
    assert n % (16 * cb * warps) == 0 and gpt <= MAXG and x.dtype == torch.float16, (n, k, config)
    _kernel(warps, cb, depth, *math)(grid=(n // (16 * cb * warps), -(-G // gpt), 1), block=(32 * warps, 1, 1),
                              args=[x.contiguous(), frags, qzeros, scales, out, n, k, gpt, out, out, out])
    return out


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),  # a 64-byte union
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


def launch_pdl(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch an NVRTC kernel (`torch.cuda._compile_kernel`) on the current stream with programmatic stream
    serialization allowed (cuLaunchKernelEx, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION), as Triton's
    launch_pdl does: torch's launcher takes no launch attributes."""
    keep, ptrs = [], []
    for a in args:
        v = ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
        keep.append(v)
        ptrs.append(ctypes.cast(ctypes.byref(v), ctypes.c_void_p))
    params = (ctypes.c_void_p * len(ptrs))(*ptrs)
    attr = _LaunchAttr(id=6, value=1)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: allowed
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(attr), 1)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    err = lib.cuLaunchKernelEx(ctypes.byref(cfg), kernel.func, params, None)
    assert err == 0, f"cuLaunchKernelEx failed: {err}"


class MmaResidual:
    """x [K] fp16 -> fp16(fp16(x @ W) + residual) [1, N] through the tensor-core GEMV with the residual epilogue and
    programmatic dependent launch (EPI): a drop-in for the fused Triton GEMV of an mlp c_proj (no bias), holding
    the layer's weights repacked in fragment order (a second copy: an experiment)."""

    def __init__(self, layer, config=(4, 2, 2, 16, 2)):
        self.frags = repack_fragments(layer.qweight)
        self.qzeros, self.scales = layer.qzeros, layer.scales
        warps, cb, depth, split, math = config
        self.n, self.k = layer.out_features, layer.in_features
        G = self.k // 128
        self.gpt = -(-G // split)
        self.grid = (self.n // (16 * cb * warps), -(-G // self.gpt), 1)
        self.block = (32 * warps, 1, 1)
        self.kernel = _kernel(warps, cb, depth, math, 1)
        self.ws = torch.zeros(self.n, device=layer.qweight.device, dtype=torch.float32)
        self.cnt = torch.zeros(self.grid[0], device=layer.qweight.device, dtype=torch.int32)

    def __call__(self, x, residual):
        out = torch.empty((1, self.n), device=x.device, dtype=torch.float16)
        launch_pdl(self.kernel, self.grid, self.block, [x.reshape(-1), self.frags, self.qzeros, self.scales,
                                                         self.ws, self.n, self.k, self.gpt, residual.reshape(-1),
                                                         out, self.cnt])
        return out
