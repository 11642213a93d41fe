"""A batch-1 Int4 GEMV with no split-K (an experiment for the batch-1 Int4 path; the product is unchanged): a program
per strip of 4 output columns over the whole input, the packed words repacked at load time so that a program's
loads are contiguous runs and each thread holds rows of a single quantization group.

Layout (`repack(qweight, rpt, threads)`): logical packed row r = b * threads * rpt + t * rpt + j (block b, thread
t, its row j) of columns 4s..4s+3 is stored at [s, b, j, t, 0:4], so load j of a program reads its threads' 16
bytes each in a row, and thread t's rpt rows lie in one group (16 rows). Each thread sums its rows in half2
(`_int4_word_fma`, as v4), scales the sum once, and the program adds its threads' sums: no atomics, no arrival
count, no program finishing another's work. Many small programs (N / 4) keep many warps per SM. Scales, zeros and
x stay in the official layout.

Per shape, 8 distinct weights replayed back to back from a CUDA graph, against the fused stream-K kernel
(`gptq_fused.fused_int4_gemv`, fp16 input, no fused work) and the copy bound; outputs checked against the
dequantized weights.

    cd bench && PYTHONPATH=..:. python bench_strip.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench_quant import graph_us
from bench_streamk import fused_baselines
from benchlib import copy_bandwidth, log, save_json
from qwenlm.kernels import sync
from qwenlm.kernels.gptq_int4 import _hadd2, _int4_word_fma
from qwenlm.kernels.sync import gdc_launch_dependents, gdc_wait

COPIES = 8


def repack(qweight: torch.Tensor, rpt: int = 16, threads: int = 32) -> torch.Tensor:
    """[K/8, N] official packed words -> [N/4, blocks, rpt, threads, 4]: logical row b * threads * rpt + t * rpt + j
    at [s, b, j, t] (see the module docstring); rows padded to whole blocks with zeros (never read: the kernel
    masks them)."""
    R, N = qweight.shape
    rows = rpt * threads
    nb = -(-R // rows)
    pad = torch.zeros(nb * rows, N, dtype=qweight.dtype, device=qweight.device)
    pad[:R] = qweight
    return pad.view(nb, threads, rpt, N // 4, 4).permute(3, 0, 2, 1, 4).contiguous()


@triton.jit
def _strip_words(qw_ptr, s, b, R, NB: tl.constexpr, RPT: tl.constexpr, T: tl.constexpr):
    """Block b's packed words of strip s: [T, RPT, 4] (rows past R masked to 0)."""
    t = tl.arange(0, T)[:, None, None]
    j = tl.arange(0, RPT)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    r = b * (T * RPT) + t * RPT + j
    return tl.load(qw_ptr + ((s * NB + b) * RPT + j) * (T * 4) + t * 4 + c, mask=r < R, other=0)


@triton.jit
def _strip_block(x32, qw, qz_ptr, s_ptr, s, b, N, R, G, ASM: tl.constexpr, RPT: tl.constexpr, T: tl.constexpr):
    """Block b's share of output columns 4s..4s+3 from its words qw [T, RPT, 4]: [4] float32. T threads of RPT
    rows each per block; a group (16 rows) spans 16 / RPT threads."""
    t = tl.arange(0, T)[:, None, None]
    j = tl.arange(0, RPT)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    r = b * (T * RPT) + t * RPT + j  # [T, RPT, 1] logical packed rows
    xq = tl.load(x32 + r * 4 + c, mask=r < R, other=0)  # [T, RPT, 4]: the row's 8 inputs as 4 int32 pairs
    p0 = tl.sum(tl.where(c == 0, xq, 0), 2, keep_dims=True)
    p1 = tl.sum(tl.where(c == 1, xq, 0), 2, keep_dims=True)
    p2 = tl.sum(tl.where(c == 2, xq, 0), 2, keep_dims=True)
    p3 = tl.sum(tl.where(c == 3, xq, 0), 2, keep_dims=True)
    x04 = (p0 & 0xFFFF) | (p2 << 16)
    x15 = ((p0 >> 16) & 0xFFFF) | (p2 & -65536)
    x26 = (p1 & 0xFFFF) | (p3 << 16)
    x37 = ((p1 >> 16) & 0xFFFF) | (p3 & -65536)
    g = (b * (T * RPT) + tl.arange(0, T)[:, None] * RPT) // 16  # [T, 1] this thread's group
    col = s * 4 + tl.arange(0, 4)[None, :]  # [1, 4]
    gok = g < G
    sc = tl.load(s_ptr + g * N + col, mask=gok, other=0.0).to(tl.float32) * 256.0  # [T, 4]
    z = ((tl.load(qz_ptr + g * (N // 8) + col // 8, mask=gok, other=0) >> ((col % 8) * 4)) & 15) + 1
    zlo = (z | 0x4400) ^ 0x8000
    zhi = ((z << 4) | 0x3400) ^ 0x8000
    zlo = (zlo | (zlo << 16))[:, None, :]
    zhi = (zhi | (zhi << 16))[:, None, :]
    if ASM:
        h = tl.reduce(_int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, qw * 0, True), 1, _hadd2)  # [T, 4]
        lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((h >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.sum(sc * (lo + hi), 0)
    # the interpreter: fp32 sums
    h = tl.sum(_int4_word_fma(qw, x04, x15, x26, x37, zlo, zhi, tl.zeros(qw.shape, tl.float32), False), 1)
    return tl.sum(sc * h, 0)


@triton.jit
def _strip(x32, qw_ptr, qz_ptr, s_ptr, s, N, R, G, NB: tl.constexpr, ASM: tl.constexpr, RPT: tl.constexpr,
           T: tl.constexpr):
    """Output columns 4s..4s+3 over the whole input: [4] float32."""
    acc = tl.zeros([4], dtype=tl.float32)
    for b in tl.static_range(NB):
        acc += _strip_block(x32, _strip_words(qw_ptr, s, b, R, NB, RPT, T), qz_ptr, s_ptr, s, b, N, R, G, ASM, RPT,
                            T)
    return acc


@triton.jit
def _strip_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, P, NB: tl.constexpr, STAGES: tl.constexpr,
                       ASM: tl.constexpr, RPT: tl.constexpr, T: tl.constexpr):
    """P programs take strips pid, pid + P, ... (P = N / 4: one strip each), pipelined."""
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    for s in tl.range(tl.program_id(0), N // 4, P, num_stages=STAGES):
        acc = _strip(x32, qw_ptr, qz_ptr, s_ptr, s, N, K // 8, K // 128, NB, ASM, RPT, T)
        tl.store(out_ptr + s * 4 + tl.arange(0, 4), acc.to(out_ptr.dtype.element_ty))


def strip_gemv(x, qw_r, qzeros, scales, out, per_sm=0, stages=1):
    """qw_r from repack(..., rpt, threads); per_sm 0: a program per strip; else per_sm programs per SM looping over
    strips."""
    rpt, threads = qw_r.shape[2], qw_r.shape[3]
    N = out.numel()
    K = x.numel()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    P = N // 4 if per_sm == 0 else min(N // 4, per_sm * sms)
    _strip_gemv_kernel[(P,)](x, qw_r, qzeros, scales, out, N, K, P, NB=qw_r.shape[1], STAGES=stages,
                             ASM=x.is_cuda, RPT=rpt, T=threads, num_warps=threads // 32, num_stages=stages)
    return out


# (rows per thread, threads per program, programs per SM (0: one per strip), stages)
SETTINGS = [(16, 32, 0, 1), (8, 64, 0, 1), (4, 128, 0, 1), (8, 32, 0, 1), (4, 64, 0, 1), (16, 32, 8, 2),
            (2, 128, 0, 1), (2, 256, 0, 1), (4, 256, 0, 1), (8, 128, 0, 1), (1, 256, 0, 1)]


@triton.jit
def _strip_residual_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, res_ptr, out_ptr, N, K, NB: tl.constexpr,
                           RPT: tl.constexpr, T: tl.constexpr, PDL: tl.constexpr):
    """out = (x @ W + bias) rounded to the model dtype, + residual: attn c_proj as the fused decode runs it, a program
    per 4-column strip. With PDL the program loads its strip's first block of words before waiting for the kernel
    before (only weights), then lets the next kernel launch."""
    s = tl.program_id(0)
    R = K // 8
    qw = _strip_words(qw_ptr, s, 0, R, NB, RPT, T)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = _strip_block(x32, qw, qz_ptr, s_ptr, s, 0, N, R, K // 128, True, RPT, T)
    for b in tl.static_range(1, NB):
        acc += _strip_block(x32, _strip_words(qw_ptr, s, b, R, NB, RPT, T), qz_ptr, s_ptr, s, b, N, R, K // 128, True,
                            RPT, T)
    n = s * 4 + tl.arange(0, 4)
    DT = out_ptr.dtype.element_ty
    y = (acc + tl.load(b_ptr + n).to(tl.float32)).to(DT).to(tl.float32) + tl.load(res_ptr + n).to(tl.float32)
    tl.store(out_ptr + n, y.to(DT))


def engine_ab(rpt=4, threads=128):
    """Batch-1 Int4 through the engine, attn c_proj by the fused stream-K kernel or by `_strip_residual_kernel`,
    alternating in one process; the greedy tokens of the two compared on 2 layers first."""
    import argparse
    import dataclasses

    from bench_quant import agree_tokens, weights_run
    from qwenlm.config import ModelConfig
    from qwenlm.engine import fused_decode
    original = fused_decode.fused_int4_gemv

    def with_strips(x, layer, residual=None, **kw):
        if residual is None or layer.in_features != layer.out_features:  # not attn c_proj
            return original(x, layer, residual=residual, **kw)
        qw = getattr(layer, "_strip_qw", None)
        if qw is None:
            qw = layer._strip_qw = repack(layer.qweight, rpt, threads)
        out = torch.empty((1, layer.out_features), device=x.device, dtype=x.dtype)
        bias = layer._kernel_bias if layer._kernel_bias is not None else torch.zeros_like(residual)
        _strip_residual_kernel[(layer.out_features // 4,)](
            x.reshape(-1), qw, layer.qzeros, layer.scales, bias, residual, out, layer.out_features, layer.in_features,
            NB=qw.shape[1], RPT=rpt, T=threads, PDL=sync.pdl(x.device), num_warps=threads // 32, num_stages=1,
            **sync.pdl_launch(x.device))
        return out

    cfg = ModelConfig()
    small = dataclasses.replace(cfg, num_hidden_layers=2)
    print(agree_tokens(small, [original, with_strips], lambda f: setattr(fused_decode, "fused_int4_gemv", f)),
          flush=True)
    args = argparse.Namespace(encode_len=2048, new_tokens=256, compile=True)
    bw = copy_bandwidth("cuda")
    for label, fn in [("stream-K", original), ("strips", with_strips)] * 2:
        fused_decode.fused_int4_gemv = fn
        log(f"attn c_proj by {label}: {weights_run(cfg, 'int4', 'cuda', torch.float16, bw, args)['tok_s']:.1f} tok/s")
    fused_decode.fused_int4_gemv = original


def main():
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name, k, n, ws, mb, xv, ref, fused in fused_baselines(bw, COPIES):
        out = torch.empty(n, device="cuda", dtype=torch.float16)
        for rpt, threads, per_sm, stages in SETTINGS:
            packed = [(repack(w[0], rpt, threads), w[1], w[2]) for w in ws]
            got = strip_gemv(xv, *packed[0], out, per_sm, stages).float()
            err = ((got - ref.view(-1)).abs().max() / ref.abs().max()).item()
            us = graph_us(lambda p: strip_gemv(xv, *p, out, per_sm, stages), packed)
            log(f"  strip, {rpt} rows x {threads} threads, {per_sm or 'a program per strip'} per SM, {stages} "
                f"stages: {us:6.2f} us ({mb * 1e3 / us:5.0f} GB/s, rel err {err:.1e})")
            rows.append(dict(linear=name, MB=round(mb, 1), rows_per_thread=rpt, threads=threads, per_sm=per_sm,
                             stages=stages, strip_us=round(us, 2), fused_us=round(fused, 2), err=err,
                             bound_us=round(mb * 1e12 / bw, 2)))
            del packed
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_strip.json")


if __name__ == "__main__":
    import sys
    engine_ab() if "--engine" in sys.argv else main()
