"""The tensor-core GEMV (bench/mma_gemv.py, CUDA) as every layer's mlp c_proj (and/or attn c_proj: --linears) in
the engine's fused batch-1 Int4 decode, against the fused Triton GEMV there, alternating in one process: an
experiment (the product path is unchanged). It checks each layer's output against the Triton kernel first, then
compares greedy tokens and tok/s.

    PYTHONPATH=.:bench python bench/bench_mma_engine.py [--repeats 3] [--ws] [--linears mlp,attn]
"""

from __future__ import annotations

import argparse
import ctypes

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
    ap.add_argument("--config", default="", help="WARPS,CB,DEPTH (STAGES),SPLIT,MATH[,MINB,TRIG] of the tensor-core "
                    "GEMV; several separated by ';' alternate with the Triton GEMV")
    ap.add_argument("--ws", action="store_true", help="the warp-specialised kernel (mma_gemv_ws)")
    ap.add_argument("--linears", default="mlp", help="which residual GEMVs to replace: mlp (c_proj), attn (c_proj)")
    args = ap.parse_args()
    model = build_model(ModelConfig(), "int4", "cuda", torch.float16)
    kind = MmaResidualWS if args.ws else MmaResidual
    cfgs = [tuple(map(int, c.split(","))) for c in args.config.split(";")] if args.config else \
        [kind.__init__.__defaults__[0]]
    which = args.linears.split(",")
    layers = [getattr(b, m).c_proj for b in model.transformer.h for m in ("mlp", "attn") if m in which]
    mmas, worst = [], 0.0
    for cfg in cfgs:
        mma = {id(layer): kind(layer, cfg) for layer in layers}
        mmas.append(mma)
        for layer in layers[:4]:
            x = torch.randn(layer.in_features, device="cuda", dtype=torch.float16) * 0.5
            res = torch.randn(layer.out_features, device="cuda", dtype=torch.float16)
            ref = ORIGINAL(x, layer, residual=res).float()
            for _ in range(3):  # the workspace and counts are left armed for the next call
                got = mma[id(layer)](x, res).float()
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        log(f"{cfg}: {registers(mma[id(layers[0])].kernel)} registers")
    log(f"tensor-core {args.linears} c_proj vs the fused Triton GEMV: max difference {worst:.1e} of the largest "
        "output")
    use = {"mma": None}

    def patched(x, layer, **kw):
        if use["mma"] is not None and id(layer) in use["mma"] and set(kw) == {"residual"}:
            return use["mma"][id(layer)](x, kw["residual"])
        return ORIGINAL(x, layer, **kw)

    fused_decode.fused_int4_gemv = patched
    rows, first = [], None
    try:
        for _ in range(args.repeats):
            for cfg, mma in [(None, None)] + list(zip(cfgs, mmas)):
                use["mma"] = mma
                tps, toks = decode_rate(model, 16, 256)
                first = first or toks
                same = next((i for i, (a, b) in enumerate(zip(toks, first)) if a != b), len(first))
                rows.append(dict(config=cfg, tok_s=tps, tokens_equal=same))
                log(f"{args.linears} c_proj by {f'the tensor-core GEMV {cfg}' if cfg else 'the fused Triton GEMV'}: "
                    f"{tps:6.1f} tok/s, {same}/{len(first)} greedy tokens before a difference from the first run's")
    finally:
        fused_decode.fused_int4_gemv = ORIGINAL
    save_json(dict(kernel=kind.__name__, configs=cfgs, linears=which, max_rel_diff=worst, rows=rows),
              "bench_mma_engine.json")


def registers(kernel) -> int:
    """Registers per thread of an NVRTC kernel (cuFuncGetAttribute, CU_FUNC_ATTRIBUTE_NUM_REGS)."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    n = ctypes.c_int(0)
    assert lib.cuFuncGetAttribute(ctypes.byref(n), 4, kernel.func) == 0
    return n.value


if __name__ == "__main__":
    main()
