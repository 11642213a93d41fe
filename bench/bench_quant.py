"""Quantized weights: bf16, GPTQ Int8 and GPTQ Int4 folders at the Qwen-7B shape, as a user loads them.

Each folder is in the official layout (random weights; the Int4 / Int8 ones with the tensors, packing and
quantization_config of Qwen-7B-Chat-Int4 / -Int8), written once under --workdir, and loaded with
`qwenlm.load(path, engine_config=EngineConfig(num_blocks=..., max_num_seqs=1))`: the defaults but for sizing the KV
pool to the 2,048 tokens the memory figure needs. Int4 runs again with kv_cache_dtype="int8". Each format runs in a
fresh process.

  batch-1 decode   16-token prompt, 256 new tokens, greedy, ignore_eos: tokens/s between the first token and the
                   last, after a warm-up request; median and spread of 5 requests
  bound            the bytes a decode step reads in that format (packed weights, scales, zeros, biases, norms,
                   the fp16/bf16 lm_head, one embedding row, the KV cache) at the measured copy bandwidth
  peak memory      torch's peak allocated bytes while encoding 2,048 tokens, weights included; beside the figures
                   of Qwen's README (A100, transformers + AutoGPTQ)
  transformers     bf16 only, as the reference row: GPTQ in transformers needs auto-gptq / gptqmodel, which do
                   not install here; batch-1 decode over 64 new tokens

    python bench/bench_quant.py            # H100: ~5 minutes (the first run ~1 of it writing the folders)
    python bench/bench_quant.py --tiny     # tiny shapes on the CPU: checks the script end to end
    python bench/bench_quant.py --only int4,bf16   # parts: bf16, int8, int4, int4_kv8, transformers
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from benchlib import (checkpoint, decode_bound, decode_rate, exit_code, greedy, isolated, log, peak_memory_gb,
                      print_table, prompts, results_path, selected, spread, start, weight_bytes_per_step, write_json)

SIZES = dict(b1_new=256, repeats=5, encode_len=2048, hf_b1_new=64, hf_repeats=3)
TINY_SIZES = dict(b1_new=16, repeats=3, encode_len=128, hf_b1_new=8, hf_repeats=2)
# (row, folder kind, kv_cache_dtype, Qwen README's A100 figures for Qwen-7B-Chat: tok/s, GB encoding 2,048 tokens)
FORMATS = {"bf16": ("bf16", "bf16", "auto", 40.93, 16.99),
           "int8": ("GPTQ Int8", "int8", "auto", 37.47, 11.20),
           "int4": ("GPTQ Int4", "int4", "auto", 50.09, 8.21),
           "int4_kv8": ("GPTQ Int4, int8 KV", "int4", "int8", None, None)}


def format_part(folder, kv_cache_dtype: str, sizes: dict, device: str) -> dict:
    """Load as a user does, encode sizes["encode_len"] tokens (peak memory), then batch-1 decode."""
    import qwenlm
    from qwenlm.engine import EngineConfig
    n = sizes["encode_len"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    blocks = -(-(n + 1) // EngineConfig().block_size)
    llm = qwenlm.load(str(folder), device=device, engine_config=EngineConfig(
        num_blocks=blocks, max_num_seqs=1, kv_cache_dtype=kv_cache_dtype))
    engine = llm.engine  # built on first use: compile, CUDA graphs
    res = {"start_s": time.time() - t}
    engine.generate([prompts(1, n, 7)[0]], greedy(1))
    res["peak_memory_gb"] = peak_memory_gb(device)
    decode_rate(engine, prompts(1, 16, 1)[0], 32)  # warm-up
    rates = [decode_rate(engine, prompts(1, 16, 10 + r)[0], sizes["b1_new"]) for r in range(sizes["repeats"])]
    res["b1_decode_tok_s"] = spread(rates)
    log(f"{folder.name} (KV {kv_cache_dtype}): batch-1 decode {statistics.median(rates):.1f} tok/s (min "
        f"{min(rates):.1f}, max {max(rates):.1f}); peak memory encoding {n} tokens {res['peak_memory_gb']:.2f} GB; "
        f"ready in {res['start_s']:.0f} s")
    return res


def transformers_part(folder, sizes: dict, device: str) -> dict:
    import hf_baseline
    return hf_baseline.figures(folder, device, dict(sizes, repeats=sizes["hf_repeats"]), batch=False)


def main() -> int:
    args, device, sizes, results, bw = start("bench_quant", __doc__, SIZES, TINY_SIZES)
    parts = selected(args, list(FORMATS) + ["transformers"])
    kinds = {FORMATS[p][1] for p in parts if p in FORMATS} | ({"bf16"} if "transformers" in parts else set())
    folders = {kind: checkpoint(args.workdir, kind, args.tiny, device) for kind in sorted(kinds)}
    context = 16 + sizes["b1_new"] / 2  # mean context of the timed decode steps
    rows = results["rows"] = {}
    for name, kind, kv, readme_tok_s, readme_gb in (FORMATS[p] for p in parts if p in FORMATS):
        r = isolated(device, format_part, folders[kind], kv, sizes, device)
        r.update(folder=str(folders[kind]), kv_cache_dtype=kv, readme_a100_tok_s=readme_tok_s,
                 readme_a100_peak_gb=readme_gb, gb_read_per_token=weight_bytes_per_step(folders[kind]) / 1e9,
                 bound_tok_s=decode_bound(bw, folders[kind], 1, context, kv))
        rows[name] = r
    if "transformers" in parts:
        hf = isolated(device, transformers_part, folders["bf16"], sizes, device)
        hf.update(bound_tok_s=decode_bound(bw, folders["bf16"], 1, context),
                  gb_read_per_token=weight_bytes_per_step(folders["bf16"]) / 1e9, readme_a100_tok_s=None,
                  readme_a100_peak_gb=None)
        rows["transformers bf16"] = hf
    write_json(results, results_path("bench_quant", args.json))

    table = []
    for name, r in rows.items():
        b1 = r.get("b1_decode_tok_s")
        cell = None if b1 is None else f"{b1['median']:,.1f} ({b1['min']:,.1f}-{b1['max']:,.1f})"
        share = None if b1 is None else f"{100 * b1['median'] / r['bound_tok_s']:.0f}%"
        table.append([name, cell, r["bound_tok_s"], share, f"{r['gb_read_per_token']:.2f}", r.get("peak_memory_gb"),
                      r["readme_a100_tok_s"], r["readme_a100_peak_gb"]])
    print_table(f"batch-1 decode and memory by weight format: {results['header']['device']}, "
                f"qwenlm {results['header']['qwenlm']}",
                ["format", "batch-1 tok/s (min-max)", "bound tok/s", "of bound", "GB read/token",
                 f"peak GB, {sizes['encode_len']} tokens", "README A100 tok/s", "README A100 GB"], table)
    print(f"transformers: {sizes['hf_b1_new']} new tokens per request; no GPTQ row (auto-gptq / gptqmodel do not "
          "install here). README: Qwen's own table, transformers + AutoGPTQ on an A100.")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
