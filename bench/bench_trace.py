"""Per-program timing of the batch-1 Int4 decode step's kernels through the engine: each program of the fused GEMVs
and of the decode attention records its SM, its start, when its wait for the kernel before returned and its end
(`sync.TRACE`, the global timer), in the CUDA graph's last replay. Prints, per kernel of a layer (medians over the
middle layers), those times relative to the end of the kernel before (its last program's end): when the first and
last programs started, when the waits returned, when programs ended, and how many programs started before the
kernel before ended.

    PYTHONPATH=.:bench python bench/bench_trace.py [--prompt 16 --new-tokens 256 --settings align=0]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench_attn_prefetch import apply, decode_rate
from bench_quant import build_model
from benchlib import OUT, log, save_json
from qwenlm.config import ModelConfig
from qwenlm.kernels import sync

KERNELS = ("c_attn", "attention", "attn c_proj", "gate_up", "mlp c_proj")


def per_kernel(tr: torch.Tensor, n_layers: int) -> list[dict]:
    """For every traced launch after the first: its programs' times (µs) relative to the end of the launch before."""
    rows = []
    for slot in range(1, len(KERNELS) * n_layers):
        prev, cur = tr[slot - 1], tr[slot]
        prev, cur = prev[prev[:, 1] > 0], cur[cur[:, 1] > 0]
        edge = prev[:, 3].max()
        start, waited, end = ((cur[:, i] - edge).double() / 1e3 for i in (1, 2, 3))
        rows.append(dict(
            layer=slot // len(KERNELS), kernel=KERNELS[slot % len(KERNELS)], programs=len(cur),
            early=int((start < 0).sum()), first_start=start.min().item(), last_start=start.max().item(),
            first_wait=waited.min().item(), median_wait=waited.median().item(), last_wait=waited.max().item(),
            median_run=(end - waited).median().item(), median_end=end.median().item(), last_end=end.max().item(),
            sms=int(cur[:, 0].unique().numel())))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--settings", default="", help="one setting of bench_attn_prefetch.py's --settings")
    args = ap.parse_args()
    apply(dict(kv.split("=") for kv in args.settings.split(",")) if args.settings else {})
    cfg = ModelConfig()
    model = build_model(cfg, "int4", "cuda", torch.float16)
    tps, _ = decode_rate(model, args.prompt, args.new_tokens)
    log(f"untraced: {tps:.1f} tok/s")
    sync.TRACE = torch.zeros(len(KERNELS) * cfg.num_hidden_layers, 1024, 8, dtype=torch.int64, device="cuda")
    tps, _ = decode_rate(model, args.prompt, args.new_tokens)  # the trace holds the last replay
    log(f"traced: {tps:.1f} tok/s")
    tr = sync.TRACE.cpu()
    sync.TRACE = None
    rows = per_kernel(tr, cfg.num_hidden_layers)
    keys = ["programs", "sms", "early", "first_start", "last_start", "first_wait", "median_wait", "last_wait",
            "median_run", "median_end", "last_end"]
    log("µs from the end of the kernel before (medians over layers 2-29): " + " | ".join(keys))
    for name in KERNELS:
        sel = [r for r in rows if r["kernel"] == name and 2 <= r["layer"] < cfg.num_hidden_layers - 2]
        vals = [statistics.median(r[k] for r in sel) for k in keys]
        log(f"{name:12s} " + " ".join(f"{v:8.2f}" for v in vals))
    save_json(dict(rows=rows, traced_tok_s=tps), "bench_trace.json")
    torch.save(tr, os.path.join(OUT, "bench_trace.pt"))  # [launch, program, (SM, start, waited, end, points 4-7)]


if __name__ == "__main__":
    main()
