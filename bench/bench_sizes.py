"""Every Qwen size on one GPU: Qwen-1.8B bf16, 14B bf16 and GPTQ Int4, 72B GPTQ Int4 (~41 GB) and Int8 (where it
fits), beside transformers where it fits, the bandwidth bound and Qwen's own figures.

Each folder is in the official layout with the size's config.json (`qwenlm.testing.size_config`: 14B and 72B with
152,064 embedding rows, 72B with rotary base 1e6 and NTK / LogN off) and random weights, written once under
--workdir, and loaded as a user loads it, `LLM(path, max_num_seqs=128)`. Parts run smallest first, each in a fresh
process; a size's folders are deleted once its parts are done (the 64 GB disk of a one-GPU machine holds one 72B
folder at a time), unless --keep. A part whose weights do not fit the GPU (or the disk) is reported as skipped.

  batch-1 decode   16-token prompt, 256 new tokens, greedy, ignore_eos: tokens/s between the first token and the
                   last, after a warm-up request; median and spread of 3 requests; against the bound
  throughput       128 requests of 512 prompt tokens and 256 new ones, added at once: output tokens / wall seconds
                   (with the KV pool the GPU has left: 72B holds far fewer than 128 x 768 tokens, so it preempts)
  bound            a decode step's bytes (weights once, one embedding row, the KV cache at the mean context) at the
                   measured copy bandwidth; for throughput, of 128 sequences (the decode steps alone)
  transformers     Qwen2ForCausalLM (SDPA, bf16) with the same weights, batch-1 decode over 32 new tokens: the bf16
                   sizes that fit (no GPTQ: auto-gptq / gptqmodel do not install here)
  Qwen README      transformers on an A100 (72B bf16 on 2 GPUs): 1.8B 54.1 / 71.1 tok/s (BF16 / Int4), 14B 24.7 /
                   38.7, 72B 8.5 / 11.3

    python bench/bench_sizes.py            # H100: ~15-20 minutes, most of it writing and loading the 72B folder
    python bench/bench_sizes.py --tiny     # tiny shapes on the CPU: checks the script end to end
    python bench/bench_sizes.py --only 14b_int4,72b_int4   # parts: 1_8b_bf16, 14b_bf16, 14b_int4, 72b_int4,
                                                            # 72b_int8, transformers
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

import torch

from benchlib import (GPTQ_CONFIG, TINY_SHAPE, checkpoint, decode_bound, decode_rate, exit_code, isolated, log,
                      print_table, prompts, results_path, selected, spread, start, throughput, weight_bytes_per_step,
                      write_json)

SIZES = dict(b1_new=256, repeats=3, batch=128, prompt_len=512, new_tokens=256, encode_len=512, hf_b1_new=32,
             hf_repeats=2)
TINY_SIZES = dict(b1_new=8, repeats=2, batch=4, prompt_len=16, new_tokens=4, encode_len=32, hf_b1_new=4, hf_repeats=1)
# part: (size, folder kind, Qwen README's A100 tok/s for it)
PARTS = {"1_8b_bf16": ("1_8b", "bf16", 54.1), "14b_bf16": ("14b", "bf16", 24.7), "14b_int4": ("14b", "int4", 38.7),
         "72b_int4": ("72b", "int4", 11.3), "72b_int8": ("72b", "int8", None)}
README_BF16 = {"1_8b": 54.1, "14b": 24.7, "72b": 8.5}  # 72B: 2 A100s
# what sets each size apart, kept at --tiny (the tiny dims are benchlib's, with whole 128-wide heads and groups)
SIZE_KEYS = ("seq_length", "max_position_embeddings", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn")


def shape_of(size: str, tiny: bool) -> dict:
    from qwenlm.testing import size_config
    cfg = size_config(size)
    return {k: cfg[k] for k in SIZE_KEYS} if tiny else cfg


def folder_bytes(size: str, kind: str, tiny: bool) -> int:
    """Bytes the folder's tensors take (16-bit floats, packed int32): what the GPU must hold, and the disk."""
    from qwenlm.config import ModelConfig
    from qwenlm.model.loader import build_model
    extra = {} if kind == "bf16" else {"quantization_config": {**GPTQ_CONFIG, "bits": int(kind[3:])}}
    cfg = ModelConfig.from_dict({**(TINY_SHAPE if tiny else {}), **shape_of(size, tiny), **extra})
    return sum(t.numel() * (t.element_size() if not t.is_floating_point() else 2)
               for t in build_model(cfg).state_dict().values())


def engine_part(folder, sizes: dict, device: str) -> dict:
    """Load as a user does; batch-1 decode, then the 128-request throughput run."""
    from qwenlm.engine import LLM
    t = time.time()
    engine = LLM(str(folder), device=device, max_num_seqs=sizes["batch"])
    res = {"start_s": time.time() - t, "num_blocks": engine.stats()["num_blocks"]}
    log(f"{folder.name}: ready in {res['start_s']:.0f} s, {res['num_blocks']} KV blocks")
    decode_rate(engine, prompts(1, 16, 1)[0], 32)  # warm-up
    rates = [decode_rate(engine, prompts(1, 16, 10 + r)[0], sizes["b1_new"]) for r in range(sizes["repeats"])]
    res["b1_decode_tok_s"] = spread(rates)
    log(f"{folder.name}: batch-1 decode {statistics.median(rates):.1f} tok/s (min {min(rates):.1f}, max "
        f"{max(rates):.1f})")
    res["throughput"] = throughput(engine, prompts(sizes["batch"], sizes["prompt_len"], 3), sizes["new_tokens"])
    log(f"{folder.name}: {sizes['batch']} x {sizes['prompt_len']}/{sizes['new_tokens']}: "
        f"{res['throughput']['output_tok_s']:.0f} output tok/s, {res['throughput']['engine']['num_preemptions']} "
        "preemptions")
    return res


def transformers_part(folder, sizes: dict, device: str) -> dict:
    import hf_baseline
    return hf_baseline.figures(folder, device, dict(sizes, repeats=sizes["hf_repeats"]), batch=False)


def room(device: str, workdir: str, need: int) -> str | None:
    """Why `need` bytes of weights cannot run here (None if they can): the GPU's memory, less room for the KV
    cache and activations (72B Int8, 76 GB, fits an H200 but not an 80 GB H100), or the disk free for the folder."""
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if need > 0.9 * total - 4e9:  # the engine's default 90% share, less a KV pool and activations
            return f"skipped: {need / 1e9:.0f} GB of weights, the GPU has {total / 1e9:.0f} GB"
    where = os.path.abspath(workdir)
    while not os.path.isdir(where):  # the workdir may not exist yet: the disk it will be on
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if need > free:
        return f"skipped: the folder needs {need / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"
    return None


def main() -> int:
    args, device, sizes, results, bw = start("bench_sizes", __doc__, SIZES, TINY_SIZES, lambda ap: ap.add_argument(
        "--keep", action="store_true", help="keep the folders written (default: delete each size's once it is done)"))
    parts = selected(args, list(PARTS) + ["transformers"])
    rows = results["rows"] = {}
    b1_context = 16 + sizes["b1_new"] / 2
    tp_context = sizes["prompt_len"] + sizes["new_tokens"] / 2
    for size in ("1_8b", "14b", "72b"):
        todo = [(p, PARTS[p][1], PARTS[p][2]) for p in parts if p in PARTS and PARTS[p][0] == size]
        if "transformers" in parts and size != "72b":
            todo.append((f"{size}_transformers", "bf16", README_BF16[size]))
        folders = []
        for name, kind, readme in todo:
            need = folder_bytes(size, kind, args.tiny)
            why = room(device, args.workdir, need)
            if why:
                log(f"{name}: {why}")
                rows[name] = {"skipped": why, "readme_a100_tok_s": readme}
                continue
            folder = checkpoint(args.workdir, kind, args.tiny, device, **shape_of(size, args.tiny))
            folders.append(folder)
            fn = transformers_part if name.endswith("transformers") else engine_part
            r = isolated(device, fn, folder, sizes, device)
            r.update(folder=str(folder), readme_a100_tok_s=readme,
                     gb_read_per_token=weight_bytes_per_step(folder) / 1e9,
                     bound_tok_s=decode_bound(bw, folder, 1, b1_context),
                     throughput_bound_tok_s=decode_bound(bw, folder, sizes["batch"], tp_context))
            rows[name] = r
        if not args.keep:
            for folder in dict.fromkeys(folders):
                shutil.rmtree(folder, ignore_errors=True)
    write_json(results, results_path("bench_sizes", args.json))

    table = []
    for name, r in rows.items():
        b1, tp = r.get("b1_decode_tok_s"), r.get("throughput", {}).get("output_tok_s")
        cell = None if b1 is None else f"{b1['median']:,.1f} ({b1['min']:,.1f}-{b1['max']:,.1f})"
        share = None if b1 is None else f"{100 * b1['median'] / r['bound_tok_s']:.0f}%"
        table.append([name, cell, r.get("bound_tok_s"), share, tp, r.get("throughput_bound_tok_s"),
                      None if "gb_read_per_token" not in r else f"{r['gb_read_per_token']:.2f}",
                      r["readme_a100_tok_s"], r.get("skipped") or r.get("error", "")])
    print_table(f"every size on one GPU: {results['header']['device']}, qwenlm {results['header']['qwenlm']}",
                ["part", "batch-1 tok/s (min-max)", "bound tok/s", "of bound", f"{sizes['batch']}-stream tok/s",
                 "decode bound", "GB read/token", "README A100 tok/s", "note"], table)
    print(f"transformers: {sizes['hf_b1_new']} new tokens per request. README: Qwen's table, transformers on an A100 "
          "(72B bf16 on 2 GPUs; no Int8 figures beside these).")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
