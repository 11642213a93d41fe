"""The fused batch-1 Int4 kernels (qwenlm.kernels.gptq_fused) at the Qwen-7B shapes, on a GPU.

1. Per linear, replayed from CUDA graphs over 8 layers' distinct weights (more than L2): the plain v4 GEMV
   (`gptq_matmul`, what the compiled regions call) against the fused kernel with its prologue / epilogue, for
   a few launch settings, with and without per-thread fences in the split-K epilogue
   (qwenlm.kernels.sync.PER_THREAD_FENCE). Achieved GB/s next to the copy bandwidth.
2. The four fused GEMVs of a layer chained over 8 layers (no attention); batch-1 decode attention with its
   context splits combined by a second launch or in the kernel.
3. --profile KIND[,KIND]: kernel times inside the engine's batch-1 decode graph (torch.profiler), per step.
4. --ablate: c_attn and gate_up with each piece of fused work alone (prologue, bias, RoPE, SiLU epilogue);
   --sweep: per linear, the fused kernel at `sweep_configs` settings.
5. --attention "kernel,splits,block_n,min_chunk,stages,warps;...": batch-1 decode attention at those settings
   against the table's, contexts 16 to 1,024 (`attention_settings`).

    python bench/bench_fused.py
    python bench/bench_fused.py --profile int4,int4-unfused
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from bench_quant import build_model, graph_us, greedy, prompts_of, random_gptq
from benchlib import copy_bandwidth, log
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, fused_decode
from qwenlm.kernels import sync
from qwenlm.kernels.attention import decode_config, paged_decode_attention
from qwenlm.kernels.gptq_fused import fused_config, fused_int4_gemv
from qwenlm.model import quant

H, FFN, HEAD = 4096, 11008, 128
FENCE0 = sync.PER_THREAD_FENCE
LAYERS = 8


def layer_of(k, n, bias=False):
    layer = quant.GPTQLinear(k, n, 4, 128, bias=bias, device="cuda")
    layer.qweight, layer.qzeros, layer.scales, layer.g_idx = random_gptq(k, n, 4)
    if bias:
        layer.bias.normal_(0, 0.1)
    layer.prepare_kernel("triton")
    return layer


def gptq_bytes(layer):
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))


def sweep_configs(base):
    """(BLOCK_N = 128 x warps, BLOCK_K, programs per SM, warps, stages) around the default: wider or narrower
    column blocks, a group's rows in 1 or 2 tiles, 1-3 programs per SM, deeper pipelines."""
    return [base] + [(128 * w, bk, per_sm, w, st) for bk in (64, 128) for per_sm in (1, 2, 3) for w in (2, 4, 8)
                     for st in (3, 4) if not (w == 8 and per_sm == 3)]


def per_linear(bw, sweep=False):
    x = torch.randn(H, device="cuda", dtype=torch.float16)
    xf = torch.randn(FFN, device="cuda", dtype=torch.float16)
    nw = torch.ones(H, device="cuda", dtype=torch.float16)
    cos = torch.rand(HEAD, device="cuda")
    sin = torch.rand(HEAD, device="cuda")
    qs = torch.ones(1, device="cuda")
    shapes = {
        "c_attn (norm, rope)": (H, 3 * H, True, dict(norm_weight=nw, eps=1e-6, rope=(cos, sin, qs, 2 * H, H, HEAD))),
        "attn c_proj (+x)": (H, H, False, dict(residual=x)),
        "gate_up (norm, silu)": (H, 2 * FFN, False, dict(norm_weight=nw, eps=1e-6, glu=FFN)),
        "mlp c_proj (+x)": (FFN, H, False, dict(residual=x)),
    }
    rows, chains = [], {}
    for name, (k, n, bias, kw) in shapes.items():
        layers = [layer_of(k, n, bias) for _ in range(LAYERS)]
        mb = gptq_bytes(layers[0]) / 1e6
        inp = x if k == H else xf
        plain = graph_us(lambda l: l(inp[None]), layers)
        base = fused_config(n, k)
        configs = [base, (base[0], base[1], 1, base[3], base[4]), (base[0], 128, base[2], base[3], 2),
                   (256, base[1], base[2], 2, base[4])]
        if sweep:
            configs = sweep_configs(base)
        src = xf if k == FFN else x
        for cfg in dict.fromkeys(configs):
            for fence in ((True, False) if cfg == base and not sweep else (FENCE0,)):
                sync.PER_THREAD_FENCE = fence
                try:
                    us = graph_us(lambda l: fused_int4_gemv(src, l, config=cfg, **kw), layers)
                except Exception as e:  # noqa: BLE001 - a setting that does not build is reported, not fatal
                    log(f"{name:22s} cfg {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(dict(linear=name, MB=round(mb, 1), config=cfg, fence=fence, fused_us=round(us, 2),
                                 plain_us=round(plain, 2), fused_GBs=round(mb * 1e3 / us),
                                 bound_us=round(mb * 1e12 / bw, 2)))
                log(f"{name:22s} {mb:5.1f} MB cfg {cfg} fence {fence:d}: fused {us:6.2f} us ({mb * 1e3 / us:4.0f} "
                    f"GB/s), plain v4 GEMV {plain:6.2f} us, copy-bandwidth bound {mb * 1e12 / bw:5.2f} us")
            sync.PER_THREAD_FENCE = FENCE0
        best = min((r for r in rows if r["linear"] == name), key=lambda r: r["fused_us"])
        log(f"{name:22s} fastest: {best['config']} {best['fused_us']:6.2f} us (table's {base})")
        chains[name] = (layers, kw, src)
    def layer_chain(i):
        for name, (layers, kw, src) in chains.items():
            fused_int4_gemv(src, layers[i], **kw)

    total_mb = sum(gptq_bytes(c[0][0]) for c in chains.values()) / 1e6
    for fence in (True, False):
        sync.PER_THREAD_FENCE = fence
        us = graph_us(layer_chain, range(LAYERS))
        log(f"layer chain (4 fused GEMVs) fence {fence:d}: {us:6.2f} us per layer, {total_mb * 1e3 / us:4.0f} GB/s "
            f"(bound {total_mb * 1e12 / bw:5.2f} us)")
        rows.append(dict(linear="layer chain", fence=fence, fused_us=round(us, 2),
                         bound_us=round(total_mb * 1e12 / bw, 2)))
    sync.PER_THREAD_FENCE = FENCE0
    return rows


def attention_inputs(ctx: int, H: int, D: int, bs: int):
    """Batch-1 decode attention inputs at `ctx` positions: 32 layers' fp16 pools (pages of bs), the block table,
    context length, query and zeroed split counters."""
    nblk = ctx // bs + 1
    pools = [(torch.randn(nblk, bs, H, D, device="cuda", dtype=torch.float16),
              torch.randn(nblk, bs, H, D, device="cuda", dtype=torch.float16)) for _ in range(32)]
    tables = torch.arange(nblk, device="cuda", dtype=torch.int32)[None]
    lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
    q = torch.randn(1, H, D, device="cuda", dtype=torch.float16)
    return pools, tables, lens, q, torch.zeros(H, device="cuda", dtype=torch.int32)


def attention_combine():
    """Batch-1 decode attention (fp16 pool, the table's mma kernel with 16 context splits), 32 layers' pools back to
    back in a CUDA graph: the splits combined by a second launch, or in the kernel (with / without per-thread
    fences), and in the kernel using only as many splits as give each >= min_chunk positions."""
    H, D, bs = 32, HEAD, 16
    base = decode_config(1, False, torch.float16)
    rows = []
    for ctx in (16, 80, 144, 272, 528, 1024):
        pools, tables, lens, q, counters = attention_inputs(ctx, H, D, bs)
        ref = paged_decode_attention(q, *pools[0], tables, lens, config=replace(base, min_chunk=0)).float()
        modes = [("second launch", 0), ("in kernel, fence", 0)] + [(f"in kernel, min_chunk {c}", c)
                                                                  for c in (0, 64, 128, 256, 512)]
        for mode, chunk in modes:
            sync.PER_THREAD_FENCE = mode == "in kernel, fence"
            c = None if mode == "second launch" else counters
            cfg = replace(base, min_chunk=chunk)
            err = (paged_decode_attention(q, *pools[0], tables, lens, config=cfg, counters=c).float() - ref).abs().max()
            us = graph_us(lambda p: paged_decode_attention(q, p[0], p[1], tables, lens, config=cfg, counters=c), pools)
            log(f"attention batch 1, context {ctx:4d}: splits combined {mode:26s} {us:6.2f} us per layer "
                f"(max diff {err.item():.1e})")
            rows.append(dict(context=ctx, mode=mode, us=round(us, 2), max_diff=err.item()))
    sync.PER_THREAD_FENCE = FENCE0
    return rows


def attention_settings(settings: str):
    """Batch-1 decode attention at each setting "kernel,splits,block_n,min_chunk,stages,warps" (min_chunk > 0: splits
    combined in the kernel from min_chunk positions each; splits 1: one program per head), 32 layers' fp16 pools
    back to back in a CUDA graph, against the table's setting; every output checked against splits 1."""
    H, D, bs = 32, HEAD, 16
    base = decode_config(1, False, torch.float16)
    cfgs = [("table", base)]
    for c in filter(None, settings.split(";")):
        kern, splits, block_n, chunk, stages, warps = c.split(",")
        cfgs.append((c, replace(base, kernel=kern, splits=int(splits), block_n=int(block_n), min_chunk=int(chunk),
                                num_stages=int(stages), num_warps=int(warps))))
    rows = []
    for ctx in (16, 80, 144, 272, 528, 1024):
        pools, tables, lens, q, counters = attention_inputs(ctx, H, D, bs)
        ref = paged_decode_attention(q, *pools[0], tables, lens, config=replace(base, splits=1, min_chunk=0)).float()
        line = []
        for label, cfg in cfgs:
            c = counters if cfg.splits > 1 else None
            err = (paged_decode_attention(q, *pools[0], tables, lens, config=cfg, counters=c).float() - ref).abs().max()
            us = graph_us(lambda p: paged_decode_attention(q, p[0], p[1], tables, lens, config=cfg, counters=c), pools)
            line.append(f"{label} {us:5.2f}")
            rows.append(dict(context=ctx, setting=label, us=round(us, 2), max_diff=err.item()))
            assert err.item() < 2e-2, (label, ctx, err.item())
        log(f"attention batch 1, context {ctx:4d}, us per layer: " + " | ".join(line))
    return rows


def profile_decode(kind):
    """Kernel times inside the batch-1 decode graph of the engine (kind: int4 | int4-unfused | int4-fence)."""
    fused_decode.ENABLED = kind != "int4-unfused"
    sync.PER_THREAD_FENCE = kind == "int4-fence"
    cfg = ModelConfig()
    model = build_model(cfg, "int4", "cuda", torch.float16)
    engine = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=1,
                                                 cuda_graph_batch_sizes=[1], compile_decode=True))
    engine.generate([prompts_of(1, 16, cfg.vocab_size, 1)[0]], greedy(8))
    engine.add_request(None, prompts_of(1, 16, cfg.vocab_size, 2)[0], greedy(40))
    engine.step()  # prefill
    steps = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished() and steps < 20:
            engine.step()
            steps += 1
    torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps
    log(f"== {kind}: {steps} decode steps, kernel time {total:.0f} us per step ==")
    for e in events[:25]:
        log(f"  {e.device_time_total / steps:8.1f} us/step  {e.count / steps:6.1f} calls/step  "
            f"{e.device_time_total / e.count:7.2f} us/call  {e.key[:90]}")
    while engine.has_unfinished():
        engine.step()
    del engine, model
    torch.cuda.empty_cache()


def ablate(bw):
    """What each piece of fused work costs: c_attn and gate_up with the prologue (RMSNorm, or a bf16 input
    converted to the fp16 row), the bias and the RoPE / SiLU epilogues switched on one at a time."""
    x = torch.randn(H, device="cuda", dtype=torch.float16)
    nw = torch.ones(H, device="cuda", dtype=torch.float16)
    cos, sin = torch.rand(HEAD, device="cuda"), torch.rand(HEAD, device="cuda")
    rope = (cos, sin, torch.ones(1, device="cuda"), 2 * H, H, HEAD)
    norm = dict(norm_weight=nw, eps=1e-6)
    cases = {"c_attn": (3 * H, [("fp16 x", False, {}), ("bf16 x", False, "bf16"), ("norm", False, norm),
                                ("bias", True, {}), ("rope", False, dict(rope=rope)),
                                ("norm bias rope", True, dict(norm, rope=rope))]),
             "gate_up": (2 * FFN, [("glu", False, dict(glu=FFN)), ("norm glu", False, dict(norm, glu=FFN))])}
    rows = []
    for name, (n, variants) in cases.items():
        for bias in (False, True):
            layers = [layer_of(H, n, bias) for _ in range(LAYERS)]
            mb = gptq_bytes(layers[0]) / 1e6
            for label, want_bias, kw in variants:
                if want_bias != bias:
                    continue
                src = x.bfloat16() if kw == "bf16" else x
                kw = {} if kw == "bf16" else kw
                us = graph_us(lambda l: fused_int4_gemv(src, l, **kw), layers)
                rows.append(dict(linear=name, work=label, us=round(us, 2), bound_us=round(mb * 1e12 / bw, 2)))
                log(f"{name:8s} {label:16s} {us:6.2f} us (copy bound {mb * 1e12 / bw:5.2f} us)")
    return rows


def ncu_calls():
    """--ncu: each fused GEMV of a layer (with its fused work) twice, then each shape's loads-only floor
    (`bench_streamk._streamk_loads_only`), for Nsight Compute to read the kernels' counters:

        ncu --kernel-name regex:"_fused_int4|_streamk_loads" --section SpeedOfLight --section WarpStateStats \
            python bench_fused.py --ncu
    """
    from bench_streamk import loads_only
    x = torch.randn(H, device="cuda", dtype=torch.float16)
    xf = torch.randn(FFN, device="cuda", dtype=torch.float16)
    nw = torch.ones(H, device="cuda", dtype=torch.float16)
    rope = (torch.rand(HEAD, device="cuda"), torch.rand(HEAD, device="cuda"), torch.ones(1, device="cuda"), 2 * H,
            H, HEAD)
    cases = [(H, 3 * H, True, x, dict(norm_weight=nw, eps=1e-6, rope=rope)), (H, H, False, x, dict(residual=x)),
             (H, 2 * FFN, False, x, dict(norm_weight=nw, eps=1e-6, glu=FFN)), (FFN, H, False, xf, dict(residual=x))]
    for k, n, bias, src, kw in cases:
        layer = layer_of(k, n, bias)
        for _ in range(2):
            fused_int4_gemv(src, layer, **kw)
        scratch = torch.empty(n, device="cuda", dtype=torch.int32)
        loads_only((layer.qweight,), scratch, fused_config(n, k))
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="", help="kinds to profile in the engine (int4, int4-unfused, int4-fence)")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--linear-only", action="store_true", help="per linear and the layer chain, no attention")
    ap.add_argument("--ncu", action="store_true", help="only: a few fused GEMV calls for Nsight Compute (ncu_calls)")
    ap.add_argument("--sweep", action="store_true", help="per linear: the fused kernel at `sweep_configs` settings")
    ap.add_argument("--attention", default="", help='only: decode attention settings '
                    '"kernel,splits,block_n,min_chunk,stages,warps;..." against the table (attention_settings)')
    ap.add_argument("--ablate", action="store_true", help="c_attn / gate_up with each piece of fused work alone")
    args = ap.parse_args()
    if args.ncu:
        return ncu_calls()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    out = {}
    if args.attention:
        out["attention_settings"] = attention_settings(args.attention)
        args.skip_linear = True
    if args.ablate:
        out["ablate"] = ablate(bw)
        args.skip_linear = True
    if not args.skip_linear and not args.attention_only:
        out["per_linear"] = per_linear(bw, args.sweep)
    if not args.skip_linear and not args.sweep and not args.linear_only:
        out["attention_combine"] = attention_combine()
    for kind in filter(None, args.profile.split(",")):
        profile_decode(kind)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
