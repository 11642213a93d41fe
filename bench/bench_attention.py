"""Paged decode attention kernel sweep: µs and GB/s of each DecodeConfig at the Qwen-7B shape (32 heads x 128).

Every timing is the median replay of a CUDA graph of many calls (as the engine runs them), the new token's K/V
stored by the call (fused into every kernel), rotating over enough layers'
pools that the K/V is not served from L2. GB/s counts the pool bytes a call must read (K and V rows of the
context, plus the (scale, zero) pairs for int8). Writes attention_sweep.json into $OUT (or ./).

    python bench/bench_attention.py            # on the GPU (about 2 minutes)
    python bench/bench_attention.py --quick    # a few configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from qwenlm.kernels.attention import paged_decode_attention
from qwenlm.kernels.attention_config import DECODE_CONFIGS, DecodeConfig

H, D, PAGE = 32, 128, 16
SHAPES = [(1, 640), (1, 2048), (4, 640), (16, 640), (128, 160), (128, 640), (128, 2048)]
T0 = time.time()


def configs(quick: bool, kernels: str) -> list[tuple[str, DecodeConfig, bool]]:
    """(name, config, fused store) of the kernels named in `kernels` (v1, v2, mma; comma-separated)."""
    out = [("v1 + store", DecodeConfig("v1", block_n=128), True),
           ("v1 alone", DecodeConfig("v1", block_n=128), False),
           ("v2 h1 n128 w4 s1 unfused", DecodeConfig(block_n=128), False)]
    tiles = [(1, 128, 4), (1, 64, 4), (1, 128, 8), (1, 32, 4), (2, 64, 4), (2, 32, 4), (2, 64, 8), (4, 32, 4),
             (4, 16, 4), (4, 32, 8), (8, 16, 4), (8, 16, 8)]
    splits = (1, 2, 4, 8, 16)
    if quick:
        tiles, splits = tiles[:1] + tiles[4:5], (1, 4)
    if "v2" not in kernels:  # the v2 settings the table uses, as the reference point
        tiles, splits = [(1, 128, 4), (1, 64, 4)], (1, 4, 16)
    for heads, bn, warps in tiles:
        for s in splits:
            out.append((f"v2 h{heads} n{bn} w{warps} s{s}", DecodeConfig(heads=heads, splits=s, block_n=bn,
                                                                          num_warps=warps), True))
    if "v1tiles" in kernels:  # v1 launch settings
        for bn, warps, stages in ((64, 4, None), (128, 8, None), (256, 8, None), (64, 2, None), (32, 2, None),
                                  (128, 4, 1), (128, 4, 2), (128, 4, 4), (64, 4, 2), (256, 4, None), (64, 1, None),
                                  (32, 1, None), (128, 2, None), (128, 1, None), (16, 1, None), (32, 1, 2),
                                  (16, 1, 2)):
            name = f"v1 n{bn} w{warps}" + (f" st{stages}" if stages else "")
            out.append((name, DecodeConfig("v1", block_n=bn, num_warps=warps, num_stages=stages), True))
    if "mma" in kernels:  # tensor-core products: tile, warps, pipeline depth
        for bn, warps, stages in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3),
                                  (32, 4, 3), (32, 4, 4), (64, 8, 3), (16, 4, 4)):
            for s in (1, 4, 16):
                out.append((f"mma n{bn} w{warps} st{stages} s{s}",
                            DecodeConfig("mma", splits=s, block_n=bn, num_warps=warps, num_stages=stages), True))
    return out


def check_store_dequantized(dev):
    """On the GPU (bf16 rounding as the model's): the int8 store's dequantized copy of new rows equals reading
    them back from the pool, bit for bit (the interpreter tests cover fp16 only)."""
    from qwenlm.kernels.kv_int8 import dequantize_rows, quantize_store_kv
    g = torch.Generator(device=dev).manual_seed(1)
    n, nb = 3000, 256
    k = torch.randn(n, H, D, device=dev, dtype=torch.bfloat16, generator=g) * 4
    v = torch.randn(n, 3, H, D, device=dev, dtype=torch.bfloat16, generator=g)[:, 1]
    pools = [torch.zeros(nb, PAGE, H, D, device=dev, dtype=torch.uint8) for _ in range(2)]
    pools += [torch.zeros(nb, PAGE, H, 2, device=dev) for _ in range(2)]
    slots = torch.randperm(nb * PAGE, device=dev, generator=g)[:n]
    kd, vd = quantize_store_kv(k, v, *pools, slots, use_triton=True, dequantized=True)
    same = all(torch.equal(rows, dequantize_rows(c.view(-1, H, D)[slots], sz.view(-1, H, 2)[slots], torch.bfloat16))
               for rows, c, sz in ((kd, pools[0], pools[2]), (vd, pools[1], pools[3])))
    print(f"int8 store, dequantized rows == rows read back from the pool (bf16, {n} tokens): {same}", flush=True)
    return same


def pool_bytes(B, ctx, int8):
    return B * ctx * H * 2 * ((D + 8) if int8 else 2 * D)


def make_inputs(B, ctx, int8, dev):
    per_layer = pool_bytes(B, ctx, int8)
    layers = max(1, min(24, math.ceil((256 << 20) / per_layer)))  # > 50 MB L2 several times over
    nblk = B * (-(-ctx // PAGE))
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (layers, nblk + 1, PAGE, H, D)
    if int8:
        kc = torch.randint(0, 256, shape, device=dev, dtype=torch.uint8, generator=g)
        vc = torch.randint(0, 256, shape, device=dev, dtype=torch.uint8, generator=g)
        ks = torch.rand(*shape[:-1], 2, device=dev, generator=g)
        vs = torch.rand(*shape[:-1], 2, device=dev, generator=g)
        for t in (ks, vs):
            t[..., 0] = t[..., 0] * 0.02 + 1e-3
            t[..., 1] = t[..., 1] * 50 + 100
    else:
        kc = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g)
        vc = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g)
        ks = vs = None
    tables = torch.randperm(nblk, device=dev, generator=g).view(B, -1).int()
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    pos = ctx - 1
    slots = tables[:, pos // PAGE].long() * PAGE + pos % PAGE
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    kn = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    vn = torch.randn(B, 3, H, D, device=dev, dtype=torch.bfloat16, generator=g)[:, 1]  # strided, as in the model
    return layers, kc, vc, ks, vs, tables, lens, slots, q, kn, vn


def time_config(inputs, cfg: DecodeConfig, fused: bool, reps: int = 5) -> float:
    layers, kc, vc, ks, vs, tables, lens, slots, q, kn, vn = inputs
    out = torch.empty_like(q)
    calls = max(layers, 8)

    def call(i):
        L = i % layers
        kw = dict(k_new=kn, v_new=vn, slots=slots) if fused else {}
        paged_decode_attention(q, kc[L], vc[L], tables, lens, out=out, k_sz=None if ks is None else ks[L],
                               v_sz=None if vs is None else vs[L], config=cfg, **kw)

    call(0)  # compile
    if q.device.type != "cuda":  # --dry-run: the interpreter, no graphs
        return 0.0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(times)


def check(inputs, cfg, int8):
    """The config's output against the v1 kernel (unfused): relative error."""
    layers, kc, vc, ks, vs, tables, lens, slots, q, kn, vn = inputs
    kw = dict(k_sz=None if ks is None else ks[0], v_sz=None if vs is None else vs[0])
    ref = paged_decode_attention(q, kc[0], vc[0], tables, lens, config=DecodeConfig("v1"), **kw).float()
    got = paged_decode_attention(q, kc[0], vc[0], tables, lens, config=cfg, **kw).float()
    return ((got - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, one small shape")
    ap.add_argument("--kernels", default="v1,v2,mma", help="kernels to sweep: v1,v2,mma")
    ap.add_argument("--pools", default="bf16,int8", help="pool dtypes to sweep: bf16,int8")
    ap.add_argument("--shapes", help="batch x context list, e.g. 32x640,128x160 (default: the standard set)")
    args = ap.parse_args()
    global SHAPES
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if args.shapes:
        SHAPES = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    if args.dry_run:
        SHAPES = [(2, 40)]
    print(f"{dev}  current table: {DECODE_CONFIGS}", flush=True)
    cfgs = configs(args.quick, args.kernels)
    res = {"store_dequantized_exact": check_store_dequantized(dev)} if dev.type == "cuda" else {}
    for int8 in [dt == "int8" for dt in args.pools.split(",")]:
        dt = "int8" if int8 else "bf16"
        for B, ctx in SHAPES:
            inputs = make_inputs(B, ctx, int8, dev)
            nbytes = pool_bytes(B, ctx, int8)
            rows = {}
            for name, cfg, fused in cfgs:
                try:
                    us = time_config(inputs, cfg, fused)
                except Exception as e:  # a config that does not compile or fit: report, keep the others
                    print(f"  {dt} B={B} ctx={ctx} {name}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows[name] = dict(us=us, gb_s=nbytes / max(us, 1e-9) / 1e3)
            errs = {n: check(inputs, c, int8) for n, c, f in cfgs
                    if n in rows and (n.endswith(" s1") or n.endswith(" s16"))}
            res[f"{dt} B={B} ctx={ctx}"] = rows
            base = rows.get("v1 + store", {}).get("us", float("nan"))
            best = sorted(rows.items(), key=lambda kv: kv[1]["us"])[:6]
            print(f"[{time.time() - T0:5.0f}s] {dt} B={B} ctx={ctx} ({nbytes / 1e6:.1f} MB/layer): v1+stores "
                  f"{base:.1f} us ({nbytes / max(base, 1e-9) / 1e3:.0f} GB/s), v1 alone {rows.get('v1 alone', {}).get('us', 0):.1f} "
                  f"us; max rel err vs v1: v2 {max([e for n, e in errs.items() if n.startswith('v2')] or [0]):.1e}, "
                  f"mma {max([e for n, e in errs.items() if n.startswith('mma')] or [0]):.1e}", flush=True)
            for n, r in best:
                print(f"    {n:28s} {r['us']:8.1f} us {r['gb_s']:6.0f} GB/s", flush=True)
            del inputs
            torch.cuda.empty_cache()
    # one config per (dtype, batch): geometric mean of its time over the contexts measured at that batch
    print("\n==== best config per dtype and batch (geomean over contexts) ====")
    for dt in ("bf16", "int8"):
        for B in sorted({b for b, _ in SHAPES}):
            keys = [k for k in res if k.startswith(f"{dt} B={B} ")]
            if not keys:
                continue
            names = set.intersection(*(set(res[k]) for k in keys))
            score = {n: math.exp(statistics.mean(math.log(max(res[k][n]["us"], 1e-9)) for k in keys)) for n in names}
            ranked = sorted(score.items(), key=lambda kv: kv[1])
            base = score.get("v1 + store", float("nan"))
            print(f"{dt} B={B}: " + ", ".join(f"{n} {s:.1f}" for n, s in ranked[:4]) + f" | v1+stores {base:.1f}")
    with open(os.path.join(os.environ.get("OUT", "."), "attention_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
