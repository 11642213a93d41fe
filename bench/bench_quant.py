"""Quantized weights and the int8 KV cache at the Qwen-7B shape, through the serving engine (LLMEngine).

Random weights in the official GPTQ layout are built directly on the GPU (the bf16 linears of the Int4/Int8
models never exist). Prints, side by side with the bandwidth bound (measured device-to-device copy):
  1. per-linear batch-1 time: bf16 cuBLAS, Int4 / Int8 Triton GEMV, Int4 tinygemm (achieved GB/s);
  2. per weight format (bf16, Int4, Int4 tinygemm, Int8, int8 on the fly, Int4 + int8 KV; "-gateup": w1 + w2
     as one GPTQ linear in the engine's GateUpMLP): peak GPU memory
     while encoding 2,048 tokens with the KV pool sized to that need, then batch-1 decode tok/s in the engine;
  3. bf16 weights, KV cache bf16 vs int8 at gpu_memory_utilization 0.9: pool tokens, 1,024-token sequences
     that fit, and 128 concurrent requests of 512 prompt / 256 output tokens (output tok/s).

    python bench/bench_quant.py                 # everything (about 5 minutes on an H100)
    python bench/bench_quant.py --sweep         # also search GEMV launch settings around the table's
    python bench/bench_quant.py --gemv-sweep    # only: every batch-1 GEMV variant (unpacking, layout, launch)
    python bench/bench_quant.py --gemv-graph    # only: Int4 GEMV, table vs _gemv_kernel_v4 settings, CUDA graphs
    python bench/bench_quant.py --gemv-graph --apply --only-batch1 --skip-linear --compile --kinds int4,bf16
                                                # the same, the fastest put in the table, then the engine
    python bench/bench_quant.py --tune --only-batch1 --compile --kinds int4,int4-gateup   # table vs prefetch
                                                # neighbours, then batch-1 through the engine (w1 + w2 fused too)
    python bench/bench_quant.py --tiny --device cpu   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import time

import torch
import torch.nn.functional as F

from benchlib import copy_bandwidth, log, replay_seconds, save_json, sync
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams, attention as engine_attention, fused_decode
from qwenlm.kernels import gptq_gemv as G, gptq_matmul as K, sync as ksync
from qwenlm.model import quant
from qwenlm.model.qwen import QWenLMHeadModel

HBM_BYTES_PER_S = 3.35e12  # H100 SXM spec
SHAPES = {"attn.c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "mlp.w1/w2": (4096, 11008),
          "mlp.c_proj": (11008, 4096)}  # (K in, N out)


def random_gptq(k, n, bits, group=128, device="cuda", dtype=torch.float16, gen=None):
    per = 32 // bits
    g = k // group
    qweight = torch.randint(-2**31, 2**31 - 1, (k // per, n), dtype=torch.int32, device=device, generator=gen)
    zeros = torch.randint(2 ** (bits - 1) - 3, 2 ** (bits - 1) + 2, (g, n), device=device, generator=gen)
    qzeros = quant.pack_cols(zeros, bits)
    scales = (torch.rand(g, n, device=device, generator=gen) * 0.004 + 0.001).to(dtype)
    g_idx = (torch.arange(k, device=device) // group).int()
    return qweight, qzeros, scales, g_idx


def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=20, rep=60)  # flushes L2 between calls: weights come from HBM


def gptq_bytes(k, n, bits, group=128):
    return k * n * bits / 8 + (k // group) * n * (2 + bits / 8)


def linear_table(sweep: bool):
    torch.manual_seed(0)
    rows, best = [], {}
    configs = [(bn, 128, sk, w, 3) for bn in (64, 128, 256) for sk in (2, 4, 8, 16) for w in (4, 8)]
    configs += [(bn, 128, 1, w, 3) for bn in (16, 32) for w in (2, 4)]  # no split: whole columns per program
    for name, (k, n) in SHAPES.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        t_bf16 = bench_ms(lambda: F.linear(x.bfloat16(), w_bf16))
        row = {"layer": name, "K": k, "N": n, "bf16_us": 1e3 * t_bf16, "bf16_GBs": 2 * k * n / t_bf16 / 1e6}
        for bits in (4, 8):
            qw, qz, s, gi = random_gptq(k, n, bits)
            ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits)
            ws = G.gemv_workspace(n, "cuda")  # split-K reduced in the kernel, as GPTQLinear runs it
            out = K.gptq_matmul(x, qw, qz, s, 128, bits, workspace=ws)
            row[f"int{bits}_maxerr"] = (out.float() - ref.float()).abs().max().item() / ref.abs().max().item()
            row[f"int{bits}_us_3_launches"] = 1e3 * bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits))
            t = bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, workspace=ws))
            if sweep and bits == 4:  # the sweep compiles one kernel per setting: Int4 only, to save time
                timed = []
                for cfg in configs:
                    try:
                        timed.append((bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg,
                                                                     workspace=ws)), cfg))
                    except Exception as e:  # a config that does not compile (registers) is skipped
                        print(f"  skip {cfg}: {type(e).__name__}")
                t_best, cfg_best = min(timed)
                best[(bits, n, k)] = cfg_best
                print(f"  int{bits} {name}: default {1e3 * t:.1f} us, best {1e3 * t_best:.1f} us with {cfg_best}")
                t = min(t, t_best)
            row[f"int{bits}_us"] = 1e3 * t
            row[f"int{bits}_GBs"] = gptq_bytes(k, n, bits) / t / 1e6
            if bits == 4:
                packed, sz = quant.to_tinygemm(qw, qz, s, 128)
                tg = torch.ops.aten._weight_int4pack_mm(x.bfloat16(), packed, 128, sz)
                row["tinygemm_maxerr"] = (tg.float() - ref.float()).abs().max().item() / ref.abs().max().item()
                t_tg = bench_ms(lambda: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), packed, 128, sz))
                row["tinygemm_us"] = 1e3 * t_tg
        row["bound_bf16_us"] = 2 * k * n / HBM_BYTES_PER_S * 1e6
        row["bound_int4_us"] = gptq_bytes(k, n, 4) / HBM_BYTES_PER_S * 1e6
        rows.append(row)
        print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}))
    if sweep:
        print("GEMV_CONFIGS = {")
        for key, cfg in best.items():
            print(f"    {key}: {cfg},")
        print("}")
        G.GEMV_CONFIGS.update(best)  # the decode runs below use the tuned settings
    return rows


GEMV_SHAPES = dict(SHAPES, **{"mlp.gate_up (w1+w2)": (4096, 22016)})


def gemv_sweep(budget_s: float = 290.0):
    """Batch-1 GEMV variants at the Qwen-7B shapes (and w1+w2 concatenated): µs and GB/s per variant against
    bf16 cuBLAS and the table's current setting. Variants: UNPACK 0/1/2 (gptq_gemv._gemv_kernel),
    BLOCK_N, SPLIT_K, warps. Prints the best per shape as table entries."""
    torch.manual_seed(0)
    t0 = time.time()
    grids = {4: [(u, bn, sk, w) for u in (2, 1) for bn in (64, 128, 256) for sk in (4, 8, 16) for w in (4, 8)],
             8: [(u, bn, sk, w) for u in (0, 1) for bn in (64, 128, 256) for sk in (4, 8, 16, 32) for w in (4,)]}
    results, best = [], {}
    for bits in (4, 8):
        for name, (k, n) in GEMV_SHAPES.items():
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            qw, qz, s, gi = random_gptq(k, n, bits)
            nbytes = gptq_bytes(k, n, bits)
            ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits).float()
            ws = G.gemv_workspace(n, "cuda")
            w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            t_bf16 = bench_ms(lambda: F.linear(x.bfloat16(), w_bf16))
            t_cur = bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, workspace=ws))
            row = dict(bits=bits, layer=name, K=k, N=n, bf16_us=1e3 * t_bf16, current_cfg=G.gemv_config(bits, n, k),
                       current_us=1e3 * t_cur, current_GBs=nbytes / t_cur / 1e6,
                       bound_us=nbytes / HBM_BYTES_PER_S * 1e6, variants={})
            for (u, bn, sk, w) in grids[bits]:
                if time.time() - t0 > budget_s:
                    break
                cfg = (bn, 128, sk, w, 3, u)
                try:
                    out = K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg, workspace=ws).float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    t = bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg, workspace=ws))
                except Exception as e:  # a setting that does not compile is skipped
                    print(f"  skip {cfg}: {type(e).__name__} {str(e)[:200]}", flush=True)
                    continue
                key = f"u{u}"
                v = row["variants"].get(key)
                if v is None or t * 1e3 < v["us"]:
                    row["variants"][key] = dict(us=1e3 * t, GBs=nbytes / t / 1e6, cfg=cfg, maxerr=err)
            for key, v in row["variants"].items():
                b = best.get((bits, n, k))
                if b is None or v["us"] < b[0]:
                    best[(bits, n, k)] = (v["us"], v["cfg"], v["maxerr"])
            results.append(row)
            print(f"int{bits} {name} {k}->{n}: bf16 {1e3 * t_bf16:.1f} us | current {row['current_us']:.1f} us "
                  f"({row['current_GBs']:.0f} GB/s) | bound {row['bound_us']:.1f} us  [{time.time() - t0:.0f}s]")
            for key, v in sorted(row["variants"].items()):
                print(f"    {key:14s} {v['us']:6.1f} us {v['GBs']:6.0f} GB/s  cfg {v['cfg']}  maxerr {v['maxerr']:.1e}")
            RESULTS["gemv_sweep"] = results
            save()
    print("best per shape (us, config, maxerr):")
    for key, b in best.items():
        print(f"    {key}: {b},")
    return results


def graph_us(call, copies, reps=20):
    """µs per call of `call(c)` replayed from one CUDA graph over `copies` (distinct weights, together larger
    than L2, run back to back as the engine's decode graph runs its linears): no launch gaps, no L2 flush."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in copies:
            call(c)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in copies:
            call(c)
    g.replay()
    return 1e6 * replay_seconds(g, reps) / (reps * len(copies))


# The Qwen-7B linears at batch 1: (K, N).
GEMV_SHAPES = {"c_attn": (4096, 12288), "attn c_proj": (4096, 4096), "gate_up": (4096, 22016),
               "mlp c_proj": (11008, 4096)}


def v4_baseline(name, k, n, bw, copies=8):
    """One shape's `copies` distinct random Int4 weights (qweight, qzeros, scales), their MB, an fp16 input [1, K],
    v4's µs per call as the table runs it (graph_us) and its output as float32, the reference; logged."""
    ws = [random_gptq(k, n, 4)[:3] for _ in range(copies)]
    mb = sum(t.numel() * t.element_size() for t in ws[0]) / 1e6
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    wsp = G.gemv_workspace(n, "cuda")
    v4 = graph_us(lambda w: G.gemv(x, *w, 128, 4, workspace=wsp), ws)
    ref = G.gemv(x, *ws[0], 128, 4).float()
    log(f"{name:12s} {mb:5.1f} MB  v4 {v4:6.2f} us ({mb * 1e3 / v4:4.0f} GB/s)  bound {mb * 1e12 / bw:5.2f} us")
    return ws, mb, x, v4, ref


# The batch-1 Int4 settings the table had before `_gemv_kernel_v4` (docs/benchmarks.md runs 3-4), per shape.
PREVIOUS_INT4 = {(12288, 4096): (256, 128, 8, 4, 3, 2), (4096, 4096): (64, 128, 16, 4, 3, 2, 1),
                 (11008, 4096): (64, 128, 8, 4, 3, 0), (22016, 4096): (256, 128, 4, 4, 3, 2),
                 (4096, 11008): (64, 128, 16, 4, 3, 0)}


def graph_configs():
    """`_gemv_kernel_v4` settings (BLOCK_N = 128 x warps, BLOCK_K, SPLIT_K, warps, stages, 4, flags): the fastest
    of the earlier sweeps (docs/benchmarks.md, run 5), each with the relaxed split-K epilogue (flag 1), every
    load of a block first (2), both, and neither; half groups per iteration (BLOCK_K 64: half the registers,
    twice the programs); and the previous table's settings."""
    base = [(512, 128, 16, 4, 2, 4), (512, 128, 8, 4, 2, 4), (256, 128, 16, 2, 3, 4), (128, 128, 4, 1, 3, 4),
            (256, 128, 8, 2, 2, 4), (256, 128, 32, 2, 1, 4), (512, 128, 16, 4, 3, 4)]
    half = [(512, 64, 32, 4, 2, 4), (512, 64, 16, 4, 2, 4), (256, 64, 64, 2, 1, 4), (256, 64, 32, 2, 3, 4)]
    return ([c + (f,) for c in base for f in (0, 1, 2, 3)] + [c + (f,) for c in half for f in (0, 3)]
            + list(dict.fromkeys(PREVIOUS_INT4.values())))


def profile_calls(configs):
    """One call per setting at attn.c_attn, for a profiler run (ncu) to read the kernels' counters."""
    k, n = SHAPES["attn.c_attn"]
    qw, qz, s, _ = random_gptq(k, n, 4)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ws = G.gemv_workspace(n, "cuda")
    for cfg in configs:
        for _ in range(2):
            K.gptq_matmul(x, qw, qz, s, 128, 4, config=cfg, workspace=ws)
    torch.cuda.synchronize()


def gemv_graph_sweep(configs=None, budget_s=150.0, apply=False):
    """Int4 batch-1 GEMV at the Qwen-7B shapes: the table's setting against `graph_configs()`, each timed two
    ways: do_bench with L2 flushed (median; the earlier runs took the mean) and back to back in a CUDA graph
    over weight copies larger than L2 (`graph_us`, the engine's situation). Prints µs, GB/s and the max error
    over 10 calls; the best per shape last (apply: into the table, for the engine runs that follow)."""
    torch.manual_seed(0)
    t0 = time.time()
    configs = configs or graph_configs()
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        nbytes = gptq_bytes(k, n, 4)
        copies = [random_gptq(k, n, 4) for _ in range(max(2, -(-150_000_000 // int(nbytes))))]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        qw, qz, s, gi = copies[0]
        ref = K.gptq_matmul_reference(x, qw, qz, s, gi, 4).float()
        ws = G.gemv_workspace(n, "cuda")

        def timed(cfg):
            cs = [tuple(c[:3]) for c in copies]
            err = max(((K.gptq_matmul(x, qw, qz, s, 128, 4, config=cfg, workspace=ws).float() - ref).abs().max()
                       / ref.abs().max()).item() for _ in range(10))
            from triton.testing import do_bench  # median: single slow readings (seen up to 7x) do not count
            t = 1e3 * do_bench(lambda: K.gptq_matmul(x, cs[0][0], cs[0][1], cs[0][2], 128, 4, config=cfg,
                                                     workspace=ws), warmup=20, rep=60, return_mode="median")
            tg = graph_us(lambda c: K.gptq_matmul(x, c[0], c[1], c[2], 128, 4, config=cfg, workspace=ws), cs)
            return dict(cfg=cfg, us=t, GBs=nbytes / t / 1e3, graph_us=tg, graph_GBs=nbytes / tg / 1e3, maxerr=err)

        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        row = dict(layer=name, K=k, N=n, bf16_us=1e3 * bench_ms(lambda: F.linear(x.bfloat16(), w_bf16)),
                   bound_us=nbytes / HBM_BYTES_PER_S * 1e6, current=timed(G.gemv_config(4, n, k)), variants=[])
        del w_bf16
        for cfg in configs:
            if time.time() - t0 > budget_s:
                print("  budget spent: remaining settings skipped", flush=True)
                break
            try:
                row["variants"].append(timed(cfg))
            except Exception as e:  # a setting that does not compile (registers, shared memory) is skipped
                print(f"  skip {cfg}: {type(e).__name__} {str(e)[:160]}", flush=True)
        rows.append(row)
        c = row["current"]
        print(f"int4 {name} {k}->{n}: bf16 {row['bf16_us']:.1f} us | table {c['cfg']}: {c['us']:.1f} us "
              f"({c['GBs']:.0f} GB/s), graph {c['graph_us']:.1f} us ({c['graph_GBs']:.0f}) | bound "
              f"{row['bound_us']:.1f} us  [{time.time() - t0:.0f}s]", flush=True)
        prev = [v for v in row["variants"] if v["cfg"] == PREVIOUS_INT4.get((n, k))]
        for v in prev + sorted(row["variants"], key=lambda v: v["graph_us"])[:12]:
            print(f"    {str(v['cfg']):33s} {v['us']:6.1f} us {v['GBs']:5.0f} GB/s | graph {v['graph_us']:6.1f} us "
                  f"{v['graph_GBs']:5.0f} GB/s | maxerr {v['maxerr']:.1e}" + ("  (previous table)" if v in prev
                                                                             else ""), flush=True)
        RESULTS["gemv_graph_sweep"] = rows
        save()
    print("best per shape by graph time (bits, N, K): setting, graph us, do_bench us")
    for r in rows:
        good = [v for v in r["variants"] if v["maxerr"] < 2e-3]
        if good:
            b = min(good, key=lambda v: v["graph_us"])
            print(f"    (4, {r['N']}, {r['K']}): {b['cfg']},  # graph {b['graph_us']:.1f} "
                  f"(table {r['current']['graph_us']:.1f}), do_bench {b['us']:.1f} (table {r['current']['us']:.1f})")
            if apply and b["graph_us"] < r["current"]["graph_us"]:
                G.GEMV_CONFIGS[(4, r["N"], r["K"])] = b["cfg"]  # the engine runs that follow use it
    return rows


def tune_table():
    """Around the table's batch-1 settings: the same with PREFETCH (next block's loads issued before this block's
    arithmetic) and a few neighbours. The fastest per shape goes into GEMV_CONFIGS for the engine runs that follow
    (and is printed as table entries)."""
    torch.manual_seed(0)
    rows = []
    for bits in (4, 8):
        for name, (k, n) in GEMV_SHAPES.items():
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            qw, qz, s, gi = random_gptq(k, n, bits)
            ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits).float()
            ws = G.gemv_workspace(n, "cuda")
            base = G.gemv_config(bits, n, k)
            cands = [base, base + (1,)]
            for bn, sk, w in ((128, 8, 4), (256, 4, 4), (256, 8, 8), (64, 16, 4)):
                cands.append((bn, 128, sk, w, 3, base[5], 1))
            timed = []
            for cfg in dict.fromkeys(cands):
                out = K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg, workspace=ws).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                t = bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg, workspace=ws))
                timed.append((1e3 * t, cfg, err))
            nbytes = gptq_bytes(k, n, bits)
            best = min(timed)
            row = dict(bits=bits, layer=name, K=k, N=n, table_us=timed[0][0], table_cfg=base,
                       best_us=best[0], best_cfg=best[1], best_GBs=nbytes / best[0] / 1e3, best_maxerr=best[2],
                       bound_us=nbytes / HBM_BYTES_PER_S * 1e6, all=[(round(t, 2), c) for t, c, _ in timed])
            rows.append(row)
            print(f"int{bits} {name}: table {timed[0][0]:.1f} us -> best {best[0]:.1f} us ({row['best_GBs']:.0f} GB/s) "
                  f"{best[1]} maxerr {best[2]:.1e}; bound {row['bound_us']:.1f} | "
                  + " ".join(f"{t:.1f}" for t, _, _ in timed), flush=True)
            if best[0] < timed[0][0]:
                G.GEMV_CONFIGS[(bits, n, k)] = best[1]
    RESULTS["gemv_tune"] = rows
    save()
    print("GEMV_CONFIGS = {")
    for key, cfg in G.GEMV_CONFIGS.items():
        print(f"    {key}: {cfg},")
    print("}", flush=True)


def prefill_table():
    """Batched rows: the tl.dot kernel up to 64 rows, Triton dequantize + cuBLAS above; fp16 cuBLAS beside."""
    rows = []
    for m in (4, 16, 2048):
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            row = {"M": m, "layer": name, "fp16_us": 1e3 * bench_ms(lambda: F.linear(x, w))}
            for bits in (4, 8):
                qw, qz, s, gi = random_gptq(k, n, bits)
                ref = K.gptq_matmul_reference(x[:4], qw, qz, s, gi, bits)
                out = K.gptq_matmul(x, qw, qz, s, 128, bits)[:4]
                row[f"int{bits}_maxerr"] = (out.float() - ref.float()).abs().max().item() / ref.abs().max().item()
                row[f"int{bits}_us"] = 1e3 * bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits))
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}))
    return rows


RESULTS: dict = {}


def save():
    save_json(RESULTS, "bench_quant.json", indent=1)


FENCE0 = ksync.PER_THREAD_FENCE
PDL0 = ksync.PDL_ENABLED


def build_model(cfg, kind, device, dtype):
    """Random Qwen weights in `dtype`: kind = bf16 | int4 | int8 (GPTQ layout, built packed: no float linears)
    | int8-otf (float model, then quant.quantize_int8_ as `qwenlm.load(quantize="int8")` does)."""
    gen = torch.Generator(device=device).manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = QWenLMHeadModel(cfg)
    finally:
        torch.set_default_dtype(old)
    if kind in ("int4", "int8"):
        quant.prepare_gptq(model, {"bits": int(kind[-1]), "group_size": 128})
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(0.0 if name.endswith("bias") else 1.0)
        for mod in model.modules():
            if isinstance(mod, quant.GPTQLinear):
                qw, qz, s, gi = random_gptq(mod.in_features, mod.out_features, mod.bits, device=device,
                                            dtype=dtype, gen=gen)
                mod.qweight, mod.qzeros, mod.scales, mod.g_idx = qw, qz, s, gi
                mod.bias.zero_()
    if kind in ("int4", "int8"):
        quant.finalize(model, device, dtype)
    if kind == "int8-otf":
        quant.quantize_int8_(model)
    return model.eval()


def fuse_gptq_gate_up(model) -> int:
    """w1 + w2 of every block as one GPTQ linear (`quant.concat_gptq_linears`) inside the engine's GateUpMLP:
    what the engine's build-time fusion does for bf16 linears, applied here to GPTQ ones."""
    from qwenlm.engine.fusion import GateUpMLP
    n = 0
    for block in model.transformer.h:
        mlp = block.mlp
        if isinstance(mlp.w1, quant.GPTQLinear) and isinstance(mlp.w2, quant.GPTQLinear):
            block.mlp = GateUpMLP(quant.concat_gptq_linears(mlp.w1, mlp.w2), mlp.c_proj)
            del mlp
            n += 1
    return n


def streamed_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every weight and buffer except the embedding table and g_idx."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors if "wte" not in n and "g_idx" not in n)


def kv_bytes_per_token(cfg, dtype, kv_cache_dtype) -> int:
    from qwenlm.engine.attention import kv_bytes_per_token_head
    return cfg.num_hidden_layers * cfg.num_attention_heads * kv_bytes_per_token_head(cfg.head_dim, dtype,
                                                                                       kv_cache_dtype)


def prompts_of(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 150000), (length,), generator=g).tolist() for _ in range(n)]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


decode_attention = engine_attention.paged_decode_attention


def _no_attention(q, k_cache, v_cache, *args, v_new=None, **kwargs):
    """Stands in for batch-1 decode attention in the `-noattn` kinds: one small copy kernel, no cache traffic."""
    return v_new.clone() if v_new is not None else torch.zeros_like(q)


def _no_attention_kernel(q, k_cache, v_cache, *args, v_new=None, **kwargs):
    """The `-nokernel` kinds: no kernel at all in attention's place (c_proj reads the new token's v as it lies)."""
    return v_new if v_new is not None else torch.zeros_like(q)


def run_timed(engine, prompts, params):
    """Run to completion: (wall s, decode-step s, decode tokens)."""
    for p in prompts:
        engine.add_request(None, p, params)
    sync(engine.runner.device)
    t0 = time.perf_counter()
    decode_s, decode_tokens = 0.0, 0
    while engine.has_unfinished():
        ts = time.perf_counter()
        outs = engine.step()  # ends with a host read of the sampled ids: the GPU is done
        # Decode steps are those whose tokens this step() processed (engine.last_step_was_prefill). The step()
        # that processes the prefill also launches the first decode step (overlapped steps, engine.py), so the
        # scheduler's flag (the kind of the step last scheduled) would count the prefill's time as decode time.
        if not engine.last_step_was_prefill:
            decode_s += time.perf_counter() - ts
            decode_tokens += len(outs)
    return time.perf_counter() - t0, decode_s, decode_tokens


def weights_run(cfg, kind, device, dtype, bw, args, kv="auto"):
    """Peak memory encoding args.encode_len tokens (pool sized to it), then batch-1 decode tok/s."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, kind.replace("-tinygemm", "").replace("-gateup", "").replace("-unfused", "")
                        .replace("-fence", "").replace("-twolaunch", ""), device, dtype)
    if kind.endswith("-gateup"):
        fuse_gptq_gate_up(model)
    bs = 16
    engine = LLMEngine(model, None, EngineConfig(num_blocks=args.encode_len // bs + 1, block_size=bs,
                                                 max_num_batched_tokens=args.encode_len, max_num_seqs=1,
                                                 cuda_graph_batch_sizes=[1], kv_cache_dtype=kv,
                                                 compile_decode=args.compile))
    engine.generate([prompts_of(1, args.encode_len, cfg.vocab_size, 7)[0]], greedy(1))
    sync(device)
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else 0
    run_timed(engine, prompts_of(1, 16, cfg.vocab_size, 1), greedy(16))  # warm-up
    _, dec_s, dec_tok = run_timed(engine, prompts_of(1, 16, cfg.vocab_size, 2), greedy(args.new_tokens))
    tps = dec_tok / dec_s
    per_tok = streamed_bytes(model) + (16 + args.new_tokens / 2) * kv_bytes_per_token(cfg, dtype, kv)
    r = dict(kind=kind, kv_cache=kv, tok_s=tps, GB_per_token=per_tok / 1e9, GBs=tps * per_tok / 1e9,
             bound_tok_s=bw / per_tok, peak_GB_encode=peak / 1e9, peak_GiB_encode=peak / 2**30)
    log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    del engine, model
    return r


def check_fused_int4(cfg, device):
    """The fused batch-1 Int4 step (qwenlm.engine.fused_decode, the engine's default for GPTQ Int4) against the
    model's own step, on 2 layers at the real shape with a biased c_attn, 3 times
    (split-K partial sums land in any order: repeats may differ by fp32 rounding, not more)."""
    from qwenlm.engine import compiled_decode, fused_decode
    from qwenlm.model.qwen import DenseKVCache
    model = build_model(dataclasses.replace(cfg, num_hidden_layers=2), "int4", device, torch.float16)
    fuse_gptq_gate_up(model)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.5)
            block.attn.c_attn._kernel_bias = block.attn.c_attn.bias
    assert fused_decode.supports(model)
    T = 40
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
    pos = torch.arange(T, device=device)[None]
    inv = model.inv_freq([1.0], device)

    def cache():
        ctx = DenseKVCache(2)
        ctx.begin(torch.ones(1, T - 1, dtype=torch.bool, device=device))
        model(ids[:, :-1], pos[:, :-1], ctx, inv, use_logn=True)
        ctx.begin(torch.ones(1, 1, dtype=torch.bool, device=device))
        return ctx

    with torch.no_grad():
        ref = model(ids[:, -1:], pos[:, -1:], cache(), inv, use_logn=True)[0, 0].float()
        x, cos, sin, qs = compiled_decode.prologue(model, ids[:, -1:], pos[:, -1:], inv, True)
        outs = []
        for fence in (True, False):  # qwenlm.kernels.sync.PER_THREAD_FENCE
            ksync.PER_THREAD_FENCE = fence
            outs += [model.transformer.ln_f(fused_decode.FusedInt4Blocks(model)(cache(), x, cos, sin, qs))[0, 0].float()
                     for _ in range(5)]
        ksync.PER_THREAD_FENCE = FENCE0
        errs = {"vs_model": max((o - ref).abs().max().item() for o in outs),
                "between_repeats": max((o - outs[0]).abs().max().item() for o in outs)}
    tol = 4e-3 * ref.abs().max().item()
    log(f"fused Int4 step vs model step: max |diff| {errs} (|ref| max {ref.abs().max().item():.3f}, tol {tol:.4f})")
    assert all(e <= tol for e in errs.values()), errs
    RESULTS["fused_int4_check"] = errs


def agree_tokens(cfg, variants, use, n_new=96, device="cuda"):
    """Greedy decoding through the engine (CUDA graphs, 3 prompts of 24 tokens, n_new new) with each variant put in
    place by use(variant), the first variant again last: per variant against the first, (tokens equal before the
    first difference, of all; max |logprob diff| over those), the last entry the first against itself."""
    model = build_model(cfg, "int4", device, torch.float16)
    prompts = prompts_of(3, 24, cfg.vocab_size, 11)
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True, logprobs=True)
    runs = []
    for v in list(variants) + [variants[0]]:
        use(v)
        engine = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=1,
                                                     cuda_graph_batch_sizes=[1], compile_decode=True))
        runs.append([o.outputs[0] for o in engine.generate(prompts, params)])
        del engine
    use(variants[0])
    result = []
    for r in runs[1:]:
        same, diff = 0, 0.0
        for x, y in zip(runs[0], r):
            n = next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids)) if a != b), len(x.token_ids))
            same += n
            diff = max([diff] + [abs(p - q) for p, q in zip(x.logprobs[:n], y.logprobs[:n])])
        result.append((same, sum(len(x.token_ids) for x in runs[0]), diff))
    return result


def check_pdl_tokens(cfg, device):
    """Programmatic dependent launch (qwenlm.kernels.sync.pdl) changes when kernels start, never what they read:
    greedy decoding through the engine's CUDA-graph decode (fused Int4 GEMVs, paged attention) on 2 layers at the
    real shape, 3 prompts of 96 new tokens, without PDL, with it, and without again. Split-K sums land in any order,
    so two runs may part where two logits tie within fp32 rounding; up to there, the chosen tokens' logprobs
    must agree as closely with PDL as between the runs without."""
    pdl, base = agree_tokens(dataclasses.replace(cfg, num_hidden_layers=2), [False, True],
                             lambda on: setattr(ksync, "PDL_ENABLED", on), device=device)
    ksync.PDL_ENABLED = PDL0
    log(f"engine greedy decode, PDL on vs off: {pdl[0]}/{pdl[1]} tokens before a difference, logprobs within "
        f"{pdl[2]:.2e}; off vs off: {base[0]}/{base[1]}, within {base[2]:.2e} "
        f"(PDL used: {ksync.pdl(torch.device(device))})")
    RESULTS["pdl_check"] = dict(on_vs_off=pdl, off_vs_off=base)
    assert pdl[2] <= max(4 * base[2], 1e-2) and pdl[0] >= min(base[0], 48), (pdl, base)


def kv_cache_runs(cfg, device, dtype, bw, args):
    """bf16 weights; for each KV format: pool size at gpu_memory_utilization 0.9 and the 128 x 512/256 run."""
    model = build_model(cfg, "bf16", device, dtype)
    wbytes = streamed_bytes(model)
    rows = []
    for kv in ("auto", "int8"):
        gc.collect()
        torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None
        t = time.time()
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=args.max_batch, kv_cache_dtype=kv,
                                                     num_blocks=args.num_blocks, compile_decode=args.compile))
        tokens = engine.blocks.num_blocks * engine.config.block_size
        row = dict(kv_cache=kv, blocks=engine.blocks.num_blocks, pool_tokens=tokens,
                   pool_GB=engine.runner.block_bytes() * engine.blocks.num_blocks / 1e9,
                   seqs_1k_fit=tokens // 1024, engine_init_s=time.time() - t)
        run_timed(engine, prompts_of(4, 64, cfg.vocab_size, 9), greedy(8))  # warm-up
        n = args.max_batch
        wall, dec_s, dec_tok = run_timed(engine, prompts_of(n, args.prompt_len, cfg.vocab_size, 3),
                                         greedy(args.new_tokens))
        kvb = kv_bytes_per_token(cfg, dtype, kv)
        step_bytes = wbytes + n * (args.prompt_len + args.new_tokens / 2) * kvb
        row.update(requests=n, output_tok_s=n * args.new_tokens / wall, decode_tok_s=dec_tok / dec_s, wall_s=wall,
                   decode_bound_tok_s=n * bw / step_bytes, preemptions=engine.scheduler.num_preemptions)
        rows.append(row)
        log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
        RESULTS["kv_cache"] = rows
        save()
        del engine
    if len(rows) == 2:
        RESULTS["kv_cache_seq_ratio"] = rows[1]["pool_tokens"] / rows[0]["pool_tokens"]
        log(f"int8 KV holds {RESULTS['kv_cache_seq_ratio']:.2f}x the tokens of bf16 KV at the same memory")
    del model


def attention_kernel_table(cfg, device, bw):
    """The paged decode kernel alone, batch 128, context 640, one layer: bf16 vs int8 pools."""
    from qwenlm.kernels.attention import paged_decode_attention
    B, ctx, bs, H, D = 128, 640, 16, cfg.num_attention_heads, cfg.head_dim
    nblk = B * ctx // bs
    tables = torch.randperm(nblk, device=device).view(B, ctx // bs).int()
    lens = torch.full((B,), ctx, device=device, dtype=torch.int32)
    q = torch.randn(B, H, D, device=device, dtype=torch.bfloat16)
    res = {}
    for kv in ("bf16", "int8"):
        if kv == "bf16":
            kc = torch.randn(nblk + 1, bs, H, D, device=device, dtype=torch.bfloat16)
            extra, nbytes = {}, 2 * B * ctx * H * D * 2
        else:
            kc = torch.randint(0, 256, (nblk + 1, bs, H, D), device=device, dtype=torch.uint8)
            sz = torch.rand(nblk + 1, bs, H, 2, device=device) * torch.tensor([0.02, 128.0], device=device)
            extra, nbytes = dict(k_sz=sz, v_sz=sz.clone()), 2 * B * ctx * H * (D + 8)
        vc = kc.clone()
        for block_n in (64, 128):
            fn = lambda: paged_decode_attention(q, kc, vc, tables, lens, block_n=block_n, **extra)  # noqa: E731
            us = 1e3 * bench_ms(fn)
            res[f"{kv}_{block_n}"] = dict(us=us, GBs=nbytes / us / 1e3)
            log(f"paged decode kernel {kv} BLOCK_N={block_n}: {us:.0f} us, {nbytes / us / 1e3:.0f} GB/s "
                f"(copy {bw / 1e9:.0f})")
        del kc, vc
    RESULTS["attention_kernel"] = res
    save()


def check_act_order():
    """An act-order layer (shuffled g_idx) on the CUDA kernel equals the dequantize path."""
    k, n, bits = 512, 256, 4
    qw, qz, s, _ = random_gptq(k, n, bits)
    layer = quant.GPTQLinear(k, n, bits, 128, device="cuda")
    layer.qweight, layer.qzeros, layer.scales = qw, qz, s
    layer.g_idx = (torch.randperm(k, device="cuda") // 128).int()
    layer.bias.normal_()
    x = torch.randn(3, 1, k, device="cuda", dtype=torch.float16)
    ref = layer(x)
    layer.prepare_kernel("triton")
    for m in (x[:1], x):
        err = (layer(m).float() - ref[: m.shape[0]].float()).abs().max().item()
        print(f"act-order check ({layer.backend}, M={m.shape[0]}): max abs err {err:.3g} (|ref| max {ref.abs().max().item():.3g})")


def check_kernels_on_gpu(device):
    """The int8 KV store and decode kernels against their torch references on the real device."""
    from qwenlm.kernels.attention import decode_config, paged_decode_attention, paged_decode_attention_ref
    from qwenlm.kernels.kv_int8 import quantize_store_kv, quantize_store_kv_ref
    B, H, D, bs, nb = 8, 32, 128, 16, 64
    k = torch.randn(B * 20, H, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B * 20, 3, H, D, device=device, dtype=torch.bfloat16)[:, 1]
    slots = torch.randperm(nb * bs, device=device)[:B * 20]
    pools = [torch.zeros(nb, bs, H, D, dtype=torch.uint8, device=device) for _ in range(2)]
    pools += [torch.zeros(nb, bs, H, 2, device=device) for _ in range(2)]
    ref = [t.clone() for t in pools]
    quantize_store_kv(k, v, *pools, slots, use_triton=True)
    quantize_store_kv_ref(k, v, *ref, slots)
    q_diff = max((a.int() - b.int()).abs().max().item() for a, b in zip(pools[:2], ref[:2]))
    sz_diff = max((a - b).abs().max().item() for a, b in zip(pools[2:], ref[2:]))
    tables = torch.randperm(nb, device=device)[:B * 8].view(B, 8).int()
    lens = torch.randint(1, 8 * bs, (B,), device=device).int()
    q = torch.randn(B, H, D, device=device, dtype=torch.bfloat16)
    out = paged_decode_attention(q, *ref[:2], tables, lens, k_sz=ref[2], v_sz=ref[3]).float()
    want = paged_decode_attention_ref(q.float(), *ref[:2], tables, lens, k_sz=ref[2], v_sz=ref[3])
    err = ((out - want).norm() / want.norm()).item()
    # the in-kernel combination of the context splits (counters) equals the second launch, bit for bit, in 50
    # repeats (a missing fence or a wrong count would show as a difference): batch 1 and 4, bf16 and int8 pools
    # (all splits used; the table's min_chunk, which uses fewer for short contexts, against the same: equal where
    # its splits cut the context at the same positions, as min_chunk = block_n does, else within rounding)
    combine_diff = min_chunk_diff = 0.0
    for b in (1, 4):
        kb = torch.randn(nb, bs, H, D, device=device, dtype=torch.bfloat16)
        for pool in ((kb, kb * 0.5), tuple(ref)):
            kw = dict(k_sz=pool[2], v_sz=pool[3]) if len(pool) == 4 else {}
            cfg = decode_config(b, len(pool) == 4, pool[0].dtype)
            every = dataclasses.replace(cfg, min_chunk=0)
            two = paged_decode_attention(q[:b], *pool[:2], tables[:b], lens[:b], config=every, **kw)
            counters = torch.zeros(b * H, dtype=torch.int32, device=device)
            for fence in (True, False):  # qwenlm.kernels.sync.PER_THREAD_FENCE
                ksync.PER_THREAD_FENCE = fence
                for _ in range(50):
                    one = paged_decode_attention(q[:b], *pool[:2], tables[:b], lens[:b], config=every,
                                                 counters=counters, **kw)
                    combine_diff = max(combine_diff, (one.float() - two.float()).abs().max().item())
                    dyn = paged_decode_attention(q[:b], *pool[:2], tables[:b], lens[:b], config=cfg,
                                                 counters=counters, **kw)
                    min_chunk_diff = max(min_chunk_diff, (dyn.float() - two.float()).abs().max().item())
                assert not counters.any()
            ksync.PER_THREAD_FENCE = FENCE0
    RESULTS["kernel_checks"] = dict(store_q_max_diff=q_diff, store_scale_zero_max_diff=sz_diff,
                                    decode_int8_rel_err=err, split_combine_in_kernel_max_diff=combine_diff,
                                    splits_as_context_needs_max_diff=min_chunk_diff)
    log(f"int8 KV kernels on GPU: store q diff {q_diff}, scale/zero diff {sz_diff:.3g}; decode rel err {err:.2e}; "
        f"splits combined in the kernel vs a second launch: max diff {combine_diff}; with the table's min_chunk: "
        f"max diff {min_chunk_diff:.2e}")
    save()


def section(name, fn, *a):
    try:
        fn(*a)
    except Exception as e:  # keep the other figures
        import traceback
        traceback.print_exc()
        RESULTS[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--gemv-sweep", action="store_true", help="only the batch-1 GEMV variant sweep")
    ap.add_argument("--gemv-graph", action="store_true",
                    help="only: Int4 batch-1 GEMV, the table vs graph_configs(), timed in CUDA graphs too")
    ap.add_argument("--sweep-s", type=float, default=150.0, help="with --gemv-graph: time budget (s)")
    ap.add_argument("--apply", action="store_true", help="with --gemv-graph: put the fastest settings in the "
                    "table, then run the engine sections")
    ap.add_argument("--profile", default="", help='only: GEMV calls for ncu, settings "a,b,c,d,e,f;..."')
    ap.add_argument("--tune", action="store_true", help="settle GEMV settings (tune_table) before the engine runs")
    ap.add_argument("--only-batch1", action="store_true", help="skip the attention-kernel and KV-pool sections")
    ap.add_argument("--fused-configs", default="", help='only: batch-1 Int4 through the engine with each fused GEMV '
                    'setting "bn,bk,per_sm,warps,stages;..." as the default (gptq_fused.FUSED_DEFAULT)')
    ap.add_argument("--against", default="", help="with --fused-configs: a gptq_fused.py file (say an earlier "
                    "commit's, from `git show`) whose fused_int4_gemv runs through the engine between runs of ours")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--batched", action="store_true", help="also the M=4/16/2048 linear table")
    ap.add_argument("--compile", action="store_true", help="engines with EngineConfig(compile_decode=True)")
    ap.add_argument("--kinds", default="int4,int4-gateup,int8,int8-gateup,bf16,int4-tinygemm,int8-otf,int4+kv8")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bw = copy_bandwidth(device)
    RESULTS.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                   copy_GBs=bw / 1e9)
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.tiny:
        cfg = ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
                          intermediate_size=512, vocab_size=1024)
        args.encode_len, args.new_tokens, args.prompt_len, args.max_batch, args.num_blocks = 64, 8, 16, 4, 64
    else:
        cfg = ModelConfig()
        args.encode_len, args.new_tokens, args.prompt_len, args.max_batch, args.num_blocks = 2048, 256, 512, 128, None
    if args.gemv_sweep:
        section("gemv_sweep", gemv_sweep)
        return
    if args.fused_configs:
        from qwenlm.kernels import gptq_fused
        base = gptq_fused.FUSED_DEFAULT
        for c in [base] + [tuple(int(v) for v in c.split(",")) for c in args.fused_configs.split(";")]:
            gptq_fused.FUSED_DEFAULT = c
            r = weights_run(cfg, "int4", device, torch.float16, bw, args)
            log(f"fused setting {c}: {r['tok_s']:.1f} tok/s")
        gptq_fused.FUSED_DEFAULT = base
        if args.against:  # ours, theirs, ours, theirs: drift shows as a difference between the same kernel's runs
            spec = importlib.util.spec_from_file_location("fused_against", args.against)
            theirs = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(theirs)
            for label, fn in [("this tree", gptq_fused.fused_int4_gemv), (args.against, theirs.fused_int4_gemv)] * 2:
                fused_decode.fused_int4_gemv = fn
                log(f"fused kernel of {label}: {weights_run(cfg, 'int4', device, torch.float16, bw, args)['tok_s']:.1f}"
                    " tok/s")
            fused_decode.fused_int4_gemv = gptq_fused.fused_int4_gemv
        return
    if args.profile:
        profile_calls([tuple(int(v) for v in c.split(",")) for c in args.profile.split(";")])
        return
    if args.gemv_graph:
        section("gemv_graph_sweep", gemv_graph_sweep, None, args.sweep_s, args.apply)
        if not args.apply:
            return
    if device == "cuda":
        section("kernel_checks", check_kernels_on_gpu, device)
        section("act_order", check_act_order)
        section("fused_int4", check_fused_int4, cfg, device)
        section("pdl_tokens", check_pdl_tokens, cfg, device)
        if args.tune:
            section("gemv_tune", tune_table)
        if not args.skip_linear:
            section("linear", lambda: RESULTS.__setitem__("linear_batch1", linear_table(args.sweep)))
            save()
    dec = RESULTS.setdefault("engine_batch1", [])
    for kind in args.kinds.split(","):
        weights, _, kv = kind.partition("+")
        dtype = torch.bfloat16 if weights.split("-fence")[0].split("-twolaunch")[0] in ("bf16", "int8-otf", "int4-tinygemm") else torch.float16
        if device == "cpu":
            dtype = torch.float32
        os.environ["QWENLM_GPTQ_KERNEL"] = "tinygemm" if weights == "int4-tinygemm" else "triton"
        fused_decode.ENABLED = weights != "int4-unfused"  # int4-unfused: the compiled regions
        ksync.PER_THREAD_FENCE = weights.endswith("-fence")  # per-thread fences: see qwenlm.kernels.sync
        engine_attention.SPLITS_COMBINED_IN_KERNEL = not weights.endswith("-twolaunch")  # attention splits
        # -noattn: batch-1 decode attention replaced by a copy of the new token's v (wrong tokens, right speed);
        # -nokernel: by nothing (c_proj reads v itself): how much of a step the attention and its boundaries take
        stub = {"-noattn": _no_attention, "-nokernel": _no_attention_kernel}.get(weights[weights.rfind("-"):])
        engine_attention.paged_decode_attention = stub or decode_attention
        weights = weights.removesuffix("-noattn").removesuffix("-nokernel")
        section(f"engine_{kind}", lambda: dec.append(
            weights_run(cfg, weights, device, dtype, bw, args, "int8" if kv == "kv8" else "auto")))
        save()
    engine_attention.paged_decode_attention = decode_attention
    os.environ["QWENLM_GPTQ_KERNEL"] = "triton"
    gc.collect()
    if device == "cuda" and not args.only_batch1:
        torch.cuda.empty_cache()
        section("attention_kernel", attention_kernel_table, cfg, device, bw)
    if not args.only_batch1:
        section("kv_cache", kv_cache_runs, cfg, device, torch.bfloat16 if device == "cuda" else torch.float32, bw,
                args)
    if device == "cuda" and args.batched:
        RESULTS["batched"] = prefill_table()
    save()
    print("\n==== Int4 / Int8 / bf16 through the engine (" + RESULTS["device"] + ") ====")
    for r in RESULTS.get("engine_batch1", []):
        print(f"{r['kind']:14s} KV {r['kv_cache']:4s} batch-1 {r['tok_s']:7.1f} tok/s  {r['GBs']:6.0f} GB/s  "
              f"bound {r['bound_tok_s']:6.1f}  peak encoding {args.encode_len}: {r['peak_GB_encode']:.2f} GB")
    for r in RESULTS.get("kv_cache", []):
        print(f"KV {r['kv_cache']:4s}: {r['pool_tokens']} tokens in the pool ({r['seqs_1k_fit']} x 1k sequences), "
              f"{r['requests']} x {args.prompt_len}/{args.new_tokens}: {r['output_tok_s']:.0f} output tok/s "
              f"(decode steps {r['decode_tok_s']:.0f}, bound {r['decode_bound_tok_s']:.0f}), "
              f"{r['preemptions']} preemptions")
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
