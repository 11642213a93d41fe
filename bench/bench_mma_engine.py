"""The tensor-core GEMV (bench/mma_gemv.py, CUDA) as every layer's mlp c_proj (and/or attn c_proj: --linears) in
the engine's fused batch-1 Int4 decode, against the fused Triton GEMV there, alternating in one process: an
experiment (the product path is unchanged). It checks each layer's output against the Triton kernel first, then
compares greedy tokens and tok/s.

    PYTHONPATH=.:bench python bench/bench_mma_engine.py [--repeats 3] [--ws] [--linears mlp,attn]
"""

from __future__ import annotations

import argparse

import torch

from bench_attn_prefetch import decode_rate
from bench_quant import build_model
from benchlib import log, save_json
from mma_gemv import MmaResidual
from ws_gemv import MmaResidualWS
from qwenlm.config import ModelConfig
from qwenlm.engine import fused_decode

ORIGINAL = fused_decode.fused_int4_gemv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="", help="WARPS,CB,DEPTH (STAGES),SPLIT,MATH of the tensor-core GEMV")
    ap.add_argument("--ws", action="store_true", help="the warp-specialised kernel (mma_gemv_ws)")
    ap.add_argument("--linears", default="mlp", help="which residual GEMVs to replace: mlp (c_proj), attn (c_proj)")
    args = ap.parse_args()
    model = build_model(ModelConfig(), "int4", "cuda", torch.float16)
    kind = MmaResidualWS if args.ws else MmaResidual
    cfg = tuple(map(int, args.config.split(","))) if args.config else kind.__init__.__defaults__[0]
    which = args.linears.split(",")
    layers = [getattr(b, m).c_proj for b in model.transformer.h for m in ("mlp", "attn") if m in which]
    mma = {id(layer): kind(layer, cfg) for layer in layers}
    worst = 0.0
    for layer in layers[:4]:
        x = torch.randn(layer.in_features, device="cuda", dtype=torch.float16) * 0.5
        res = torch.randn(layer.out_features, device="cuda", dtype=torch.float16)
        ref = ORIGINAL(x, layer, residual=res).float()
        for _ in range(3):  # the workspace and counts are left armed for the next call
            got = mma[id(layer)](x, res).float()
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    log(f"tensor-core {args.linears} c_proj vs the fused Triton GEMV: max difference {worst:.1e} of the largest "
        "output")
    use = {"on": False}

    def patched(x, layer, **kw):
        if use["on"] and id(layer) in mma and set(kw) == {"residual"}:
            return mma[id(layer)](x, kw["residual"])
        return ORIGINAL(x, layer, **kw)

    fused_decode.fused_int4_gemv = patched
    rows, first = [], None
    try:
        for _ in range(args.repeats):
            for on in (False, True):
                use["on"] = on
                tps, toks = decode_rate(model, 16, 256)
                first = first or toks
                same = next((i for i, (a, b) in enumerate(zip(toks, first)) if a != b), len(first))
                rows.append(dict(tensor_core=on, tok_s=tps, tokens_equal=same))
                log(f"{args.linears} c_proj by {'the tensor-core GEMV' if on else 'the fused Triton GEMV'}: "
                    f"{tps:6.1f} tok/s, "
                    f"{same}/{len(first)} greedy tokens before a difference from the first run's")
    finally:
        fused_decode.fused_int4_gemv = ORIGINAL
    save_json(dict(kernel=kind.__name__, config=cfg, linears=which, max_rel_diff=worst, rows=rows),
              "bench_mma_engine.json")


if __name__ == "__main__":
    main()
