"""Batch-1 Int4 GEMVs on the tensor cores (CUDA: `mma_gemv` of bench/mma_gemv.py, and with --ws settings
`mma_gemv_ws` of bench/ws_gemv.py) against the product's fused Triton GEMV (qwenlm.kernels.gptq_fused, fp16 input
read in place, no fused work), an experiment: the product path is unchanged (docs/benchmarks.md, quantization
run 16).

Per Qwen-7B shape, µs per call replayed from a CUDA graph two ways:
- DRAM: 8 distinct weights back to back (more than L2), as the decode graph runs its linears;
- L2: one weight 8 times (it stays in L2, except gate_up's 46.9 MB): the kernel with little of its DRAM time.
Checks the tensor-core result against the v4 GEMV (dequantize-equivalent) first. Also each kernel loading its
words with no arithmetic (the fused kernel's stream-K grid: `bench_streamk.loads_only`; the tensor-core kernel:
MATH 0).

    cd bench && PYTHONPATH=..:. python bench_mma.py [--configs "4,2,2,8;..."] [--ws "4,2,4,0,2;..."]
"""

from __future__ import annotations

import argparse

import torch

from bench_fused import layer_of
from bench_quant import GEMV_SHAPES, graph_us
from bench_streamk import loads_only
from benchlib import copy_bandwidth, log, save_json
from mma_gemv import fragment_check, mma_gemv, repack_fragments
from ws_gemv import mma_gemv_ws, repack_ws
from qwenlm.kernels import gptq_gemv as G
from qwenlm.kernels.gptq_fused import fused_config, fused_int4_gemv

COPIES = 8
# (WARPS, CB, DEPTH, SPLIT) per run; SPLIT None: about 4 CTAs per SM
CONFIGS = "4,2,2,0;4,2,2,0,2;4,2,2,0,0;8,1,2,0;4,1,2,0;4,2,3,0"
# the warp-specialised kernel: (WARPS, CB, STAGES, SPLIT, MATH); SPLIT 0: about 3 CTAs per SM
WS_CONFIGS = "4,2,4,0,2;4,2,8,0,2;4,2,6,0,2;8,2,6,-6,2;4,2,8,-2,2"


def split_for(n, k, warps, cb, per_sm):
    ctas_n = n // (16 * cb * warps)
    groups = k // 128
    want = max(1, (per_sm * torch.cuda.get_device_properties(0).multi_processor_count) // ctas_n)
    return min(groups, want)


def ncu_calls(cfg=(4, 2, 2, 5, 2)):
    """--ncu: c_attn's fused Triton GEMV and the tensor-core GEMV (MATH 2, and loads only) a few times each, for
    Nsight Compute (`--cache-control none` keeps the weights in L2 between its replays):

        ncu --cache-control none -k regex:"mma_gemv|_fused_int4" --section WarpStateStats --section SchedulerStats \
            python bench_mma.py --ncu
    """
    k, n = GEMV_SHAPES["c_attn"]
    layer = layer_of(k, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    frags = repack_fragments(layer.qweight)
    out = torch.zeros(n, device="cuda", dtype=torch.float32)
    for _ in range(3):
        fused_int4_gemv(x, layer)
        mma_gemv(x, frags, layer.qzeros, layer.scales, out, cfg)
        mma_gemv(x, frags, layer.qzeros, layer.scales, out, cfg[:4] + (0,))
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true", help="only: a few calls for Nsight Compute (ncu_calls)")
    ap.add_argument("--ws", default=WS_CONFIGS, help='warp-specialised kernel "WARPS,CB,STAGES,SPLIT,MATH;..." '
                    '(SPLIT 0: ~3 CTAs per SM, -P: ~P per SM)')
    ap.add_argument("--configs", default=CONFIGS, help='"WARPS,CB,DEPTH,SPLIT[,MATH];..." (SPLIT 0: ~4 CTAs per '
                    'SM, -P: ~P per SM; MATH 0: loads only)')
    args = ap.parse_args()
    if args.ncu:
        return ncu_calls()
    emu = fragment_check()
    log(f"fragment layout emulated on the CPU: max difference to W^T x {emu}")
    assert emu < 1e-9
    bw = copy_bandwidth("cuda")
    log(f"{torch.cuda.get_device_name()} copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name, (k, n) in GEMV_SHAPES.items():
        layers = [layer_of(k, n) for _ in range(COPIES)]
        ws = [(l.qweight, l.qzeros, l.scales) for l in layers]
        mb = sum(t.numel() * t.element_size() for t in ws[0]) / 1e6
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = G.gemv(x, *ws[0], 128, 4).float().reshape(-1)
        fused_dram = graph_us(lambda l: fused_int4_gemv(x, l), layers)
        fused_l2 = graph_us(lambda l: fused_int4_gemv(x, l), [layers[0]] * COPIES)
        got_fused = fused_int4_gemv(x, layers[0]).float().reshape(-1)
        scratch = torch.empty(n, device="cuda", dtype=torch.int32)
        floor = graph_us(lambda l: loads_only((l.qweight,), scratch, fused_config(n, k)), layers)
        err_f = ((got_fused - ref).abs().max() / ref.abs().max()).item()
        log(f"{name:12s} {mb:5.1f} MB  bound {mb * 1e12 / bw:5.2f} us | fused Triton: DRAM {fused_dram:6.2f} us, "
            f"L2 {fused_l2:6.2f} us, rel err {err_f:.1e}; its grid loading the words only {floor:6.2f} us")
        rows.append(dict(linear=name, MB=round(mb, 1), kernel="fused", dram_us=fused_dram, l2_us=fused_l2,
                         err=err_f, loads_only_us=floor))
        frags = [(repack_fragments(l.qweight), l.qzeros, l.scales) for l in layers]
        out = torch.zeros(n, device="cuda", dtype=torch.float32)
        runs = [(mma_gemv, tuple(map(int, c.split(","))), 4) for c in args.configs.split(";") if c]
        runs += [(mma_gemv_ws, tuple(map(int, c.split(","))), 3) for c in args.ws.split(";") if c]
        blobs = {}  # the warp-specialised kernel's blocks per column run
        for fn, cfg, per_sm in runs:
            warps, cb, depth, split, *math = cfg
            if n % (16 * cb * warps):
                continue
            if split <= 0:
                split = split_for(n, k, warps, cb, -split or per_sm)
            c = (warps, cb, depth, split, *math)
            try:
                if fn is mma_gemv_ws:
                    cols = 16 * cb * warps
                    if cols not in blobs:
                        blobs[cols] = [(repack_ws(*f, cols),) for f in frags]
                    ws_ = blobs[cols]
                else:
                    ws_ = frags
                out.zero_()
                fn(x, *ws_[0], out, c)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                dram = graph_us(lambda f: fn(x, *f, out, c), ws_)
                l2 = graph_us(lambda f: fn(x, *f, out, c), [ws_[0]] * COPIES)
            except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
                log(f"  {fn.__name__} {c}: failed: {type(e).__name__}: {str(e)[:3000]}")
                continue
            log(f"  {fn.__name__} {c}: DRAM {dram:6.2f} us ({mb * 1e3 / dram:4.0f} GB/s), "
                f"L2 {l2:6.2f} us, rel err {err:.1e}")
            rows.append(dict(linear=name, MB=round(mb, 1), kernel=fn.__name__, config=c, dram_us=dram, l2_us=l2,
                             err=err))
        del layers, frags
    save_json(dict(copy_GBs=bw / 1e9, rows=rows), "bench_mma.json")


if __name__ == "__main__":
    main()
