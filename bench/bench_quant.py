"""Quantized linears and batch-1 decode at Qwen-7B shape, random weights in the official GPTQ layout.

Prints, side by side: per-linear kernel time for bf16 (cuBLAS), Int4 (our Triton kernel, torch's tinygemm)
and Int8 (our Triton kernel), achieved GB/s against the HBM bound; then batch-1 decode tok/s (CUDA graph,
static KV cache, context <= 256) and peak memory for bf16, Int4, Int8 and on-the-fly int8.

    python bench/bench_quant.py                 # everything
    python bench/bench_quant.py --sweep         # also search the GEMV launch settings per shape
    python bench/bench_quant.py --tiny --device cpu   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from qwenlm.config import ModelConfig
from qwenlm.kernels import gptq_matmul as K
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
    configs = [(bn, bk, sk, w, 3) for bn in (32, 64, 128, 256) for bk in (64, 128) for sk in (4, 8, 16, 32)
               for w in (2, 4, 8)]
    for name, (k, n) in SHAPES.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        t_bf16 = bench_ms(lambda: F.linear(x.bfloat16(), w_bf16))
        row = {"layer": name, "K": k, "N": n, "bf16_us": 1e3 * t_bf16, "bf16_GBs": 2 * k * n / t_bf16 / 1e6}
        for bits in (4, 8):
            qw, qz, s, gi = random_gptq(k, n, bits)
            ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits)
            out = K.gptq_matmul(x, qw, qz, s, 128, bits)
            row[f"int{bits}_maxerr"] = (out.float() - ref.float()).abs().max().item() / ref.abs().max().item()
            t = bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits))
            if sweep:
                timed = []
                for cfg in configs:
                    try:
                        timed.append((bench_ms(lambda: K.gptq_matmul(x, qw, qz, s, 128, bits, config=cfg)), cfg))
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
        K.GEMV_CONFIGS.update(best)  # the decode runs below use the tuned settings
    return rows


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


class StaticKV:
    """Preallocated K/V [L,1,S,h,d]; one token per step written at `pos` (CUDA-graph friendly)."""

    def __init__(self, cfg, S, device, dtype):
        shape = (cfg.num_hidden_layers, 1, S, cfg.num_attention_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.arange = torch.arange(S, device=device)
        self.mask = None

    def attend(self, layer, q, k, v):
        self.k[layer].index_copy_(1, self.pos, k)
        self.v[layer].index_copy_(1, self.pos, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[layer].transpose(1, 2),
                                             self.v[layer].transpose(1, 2), attn_mask=self.mask)
        return out.transpose(1, 2)


def build_model(cfg, kind, device, dtype):
    """Random Qwen weights: kind = bf16 | int4 | int8 (GPTQ layout) | int8-otf (per-channel, on the fly)."""
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    if kind in ("int4", "int8"):
        quant.prepare_gptq(model, {"bits": int(kind[-1]), "group_size": 128})
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
        for mod in model.modules():
            if isinstance(mod, quant.GPTQLinear):
                qw, qz, s, gi = random_gptq(mod.in_features, mod.out_features, mod.bits, device=device, gen=gen)
                mod.qweight, mod.qzeros, mod.scales, mod.g_idx = qw, qz, s, gi
                mod.bias.zero_()
    model.to(dtype)
    if kind in ("int4", "int8") and torch.device(device).type == "cuda":
        quant.finalize(model, device, dtype)
    if kind == "int8-otf":
        quant.quantize_int8_(model)
    return model.eval()


@torch.inference_mode()
def decode_tok_s(cfg, kind, device, dtype, steps=200, S=256):
    torch.cuda.empty_cache() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, kind, device, dtype)
    ctx = StaticKV(cfg, S, device, dtype)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    inv_freq = model.inv_freq([1.0], device)

    def step():
        ctx.mask = (ctx.arange <= ctx.pos)[None, None, None, :]
        hidden = model(ids, ctx.pos.view(1, 1), ctx, inv_freq, use_logn=False)
        ids.copy_(model.logits(hidden[:, -1]).argmax(-1).view(1, 1))
        ctx.pos.add_(1)

    for _ in range(3):  # compile the kernels before capture
        step()
    if device == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
        ctx.pos.zero_()
        run()
        torch.cuda.synchronize()
    else:
        run = step
    ctx.pos.zero_()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for name, t in
                       list(model.named_parameters()) + list(model.named_buffers()) if "wte" not in name)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    del model, ctx
    return {"kind": kind, "tok_s": steps / dt, "GB_per_token": weight_bytes / 1e9,
            "GBs": weight_bytes * steps / dt / 1e9, "bound_tok_s": HBM_BYTES_PER_S / weight_bytes, "peak_GB": peak}


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--kinds", default="bf16,int4,int4-tinygemm,int8,int8-otf")
    args = ap.parse_args()
    results = {}
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
        check_act_order()
        if not args.skip_linear:
            results["linear_batch1"] = linear_table(args.sweep)
    cfg = ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
                      intermediate_size=512, vocab_size=1024) if args.tiny else ModelConfig()
    dec = []
    for kind in args.kinds.split(","):
        dtype = torch.bfloat16 if kind in ("bf16", "int8-otf", "int4-tinygemm") else torch.float16
        if args.device == "cpu":
            dtype = torch.float32
        os.environ["QWENLM_GPTQ_KERNEL"] = "tinygemm" if kind == "int4-tinygemm" else "triton"
        r = decode_tok_s(cfg, kind.replace("-tinygemm", ""), args.device, dtype, steps=20 if args.tiny else 200)
        r["kind"] = kind
        dec.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    results["decode_batch1"] = dec
    if args.device == "cuda" and not args.skip_linear:
        results["batched"] = prefill_table()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_quant.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
