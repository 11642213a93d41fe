"""How fast is qwenlm for me: the serving engine at the Qwen-7B shape, beside transformers and the bandwidth bound.

A bf16 checkpoint folder in the official layout (random weights at the real shape, ~15 GB, written once under
--workdir) loaded as a user loads it, `LLM(path, max_num_seqs=128)`: the default EngineConfig but for sizing
(torch.compile, CUDA graphs and overlapped steps on, as on any GPU). Each part runs in a fresh process.

  batch-1 decode     16-token prompt, 256 new tokens, greedy, ignore_eos: tokens/s between the first token and the
                     last (decode steps only), after a warm-up request; median and spread of 5 requests
  throughput         128 requests of 512 prompt tokens and 256 new ones, added at once: output tokens / wall
                     seconds of the whole run, KV cache bf16 and kv_cache_dtype="int8"
  TTFT               add_request to the first token back, 16- and 2,048-token prompts (fresh: no prefix-cache hits)
  peak memory        torch's peak allocated bytes while encoding 2,048 tokens, weights included, the KV pool sized to
                     that need (num_blocks); Qwen's README reports 16.99 GB with transformers
  transformers       Qwen2ForCausalLM (SDPA, bf16) with the same weights, `generate`: batch-1 decode over 64 new
                     tokens (~12 tok/s: bounded), throughput at batch 32 (128 would take minutes), TTFT, peak memory
  bound              a decode step's bytes (weights + KV read) at the measured copy bandwidth

    python bench/bench_engine.py            # H100: ~6 minutes (the first run ~1 of it writing the folder)
    python bench/bench_engine.py --tiny     # tiny shapes on the CPU: checks the script end to end
    python bench/bench_engine.py --only qwenlm,int8_kv   # parts: qwenlm, int8_kv, memory, transformers
    python bench/bench_engine.py --only qwenlm --tp 2     # the engine split over 2 GPUs (the bound stays one GPU's)

Prints one table (figure | qwenlm | transformers | bound); writes the JSON and a PNG of the same figures.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from benchlib import (checkpoint, decode_bound, decode_rate, exit_code, greedy, isolated, kv_bytes_per_token, log,
                      peak_memory_gb, print_table, prompts, results_path, safetensors_bytes, selected, spread, start,
                      throughput, time_to_first_token, write_json)

SIZES = dict(b1_new=256, repeats=5, batch=128, prompt_len=512, new_tokens=256, ttft_lens={"short": 16, "long": 2048},
             ttft_repeats=5, encode_len=2048, hf_b1_new=64, hf_repeats=3, hf_batch=32)
TINY_SIZES = dict(b1_new=16, repeats=3, batch=4, prompt_len=32, new_tokens=8, ttft_lens={"short": 16, "long": 128},
                  ttft_repeats=3, encode_len=128, hf_b1_new=8, hf_repeats=2, hf_batch=2)


def engine_part(folder, kv_cache_dtype: str, sizes: dict, everything: bool, device: str, tp: int = 1) -> dict:
    """One engine: batch-1 decode and TTFT (everything=True), then the throughput run."""
    from qwenlm.engine import LLM
    t = time.time()
    engine = LLM(str(folder), device=device, max_num_seqs=sizes["batch"], kv_cache_dtype=kv_cache_dtype,
                 tensor_parallel_size=tp)
    try:
        return _engine_figures(engine, t, kv_cache_dtype, sizes, everything)
    finally:
        engine.shutdown()


def _engine_figures(engine, t: float, kv_cache_dtype: str, sizes: dict, everything: bool) -> dict:
    res = {"start_s": time.time() - t}  # load + compile + CUDA graphs
    log(f"qwenlm (KV {kv_cache_dtype}) ready in {res['start_s']:.0f} s: {engine.stats()['num_blocks']} KV blocks")
    decode_rate(engine, prompts(1, 16, 1)[0], 32)  # warm-up
    if everything:
        rates = [decode_rate(engine, prompts(1, 16, 10 + r)[0], sizes["b1_new"]) for r in range(sizes["repeats"])]
        res["b1_decode_tok_s"] = spread(rates)
        log(f"qwenlm batch-1 decode: {statistics.median(rates):.1f} tok/s (min {min(rates):.1f}, max {max(rates):.1f})")
        for which, n in sizes["ttft_lens"].items():
            time_to_first_token(engine, prompts(1, n, 50)[0])  # warm-up at this length
            ms = [1e3 * time_to_first_token(engine, prompts(1, n, 100 + r)[0]) for r in range(sizes["ttft_repeats"])]
            res[f"ttft_{which}_ms"] = spread(ms)
            log(f"qwenlm TTFT {n} tokens: {statistics.median(ms):.1f} ms")
    batch = prompts(sizes["batch"], sizes["prompt_len"], 3)
    res["throughput"] = throughput(engine, batch, sizes["new_tokens"])
    log(f"qwenlm (KV {kv_cache_dtype}) {sizes['batch']} x {sizes['prompt_len']}/{sizes['new_tokens']}: "
        f"{res['throughput']['output_tok_s']:.0f} output tok/s, {res['throughput']['engine']['num_preemptions']} "
        "preemptions")
    return res


def memory_part(folder, sizes: dict, device: str) -> dict:
    """Peak memory encoding sizes["encode_len"] tokens, the pool holding just that many (sizing only)."""
    from qwenlm.engine import LLM, EngineConfig
    n = sizes["encode_len"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = LLM(str(folder), device=device, max_num_seqs=1, num_blocks=-(-(n + 1) // EngineConfig().block_size))
    engine.generate([prompts(1, n, 7)[0]], greedy(1))
    gb = peak_memory_gb(device)
    log(f"qwenlm peak memory encoding {n} tokens: {gb:.2f} GB")
    return {"peak_memory_gb": gb}


def transformers_part(folder, sizes: dict, device: str) -> dict:
    import hf_baseline
    return hf_baseline.figures(folder, device, dict(sizes, repeats=sizes["hf_repeats"]))


def figures(parts: dict, bw: float, folder, sizes: dict) -> dict:
    """Per figure: label, unit, qwenlm (median where repeated, with its spread), transformers, bound, note."""
    q, kv8, mem, hf = (parts.get(k, {}) for k in ("qwenlm", "qwenlm_int8_kv", "memory", "transformers"))
    B, P, N, n = sizes["batch"], sizes["prompt_len"], sizes["new_tokens"], sizes["encode_len"]

    def med(part, key):
        v = part.get(key)
        return None if v is None else v["median"]

    def rng(part, key):
        v = part.get(key)
        return None if v is None else [v["min"], v["max"]]

    weights = sum(safetensors_bytes(folder).values())
    out = {
        "batch1_decode_tok_s": dict(
            label="batch-1 decode", unit="tok/s", qwenlm=med(q, "b1_decode_tok_s"), spread=rng(q, "b1_decode_tok_s"),
            transformers=med(hf, "b1_decode_tok_s"), bound=decode_bound(bw, folder, 1, 16 + sizes["b1_new"] / 2),
            note=f"{sizes['b1_new']} new tokens (transformers {sizes['hf_b1_new']})"),
        "throughput_tok_s": dict(
            label=f"{B} x {P}/{N}, bf16 KV", unit="output tok/s", qwenlm=q.get("throughput", {}).get("output_tok_s"),
            transformers=hf.get("batch", {}).get("output_tok_s"), bound=decode_bound(bw, folder, B, P + N / 2),
            note=f"transformers at batch {sizes['hf_batch']}; bound: decode steps alone"),
        "throughput_int8_kv_tok_s": dict(
            label=f"{B} x {P}/{N}, int8 KV", unit="output tok/s",
            qwenlm=kv8.get("throughput", {}).get("output_tok_s"), transformers=None,
            bound=decode_bound(bw, folder, B, P + N / 2, "int8"), note="bound: decode steps alone"),
    }
    for which, length in sizes["ttft_lens"].items():
        key = f"ttft_{which}_ms"
        out[key] = dict(label=f"TTFT, {length}-token prompt", unit="ms", qwenlm=med(q, key), spread=rng(q, key),
                        transformers=med(hf, key), bound=None, note="median")
    out["peak_memory_gb"] = dict(
        label=f"peak memory encoding {n}", unit="GB", qwenlm=mem.get("peak_memory_gb"),
        transformers=hf.get("peak_memory_gb"), bound=(weights + n * kv_bytes_per_token(folder)) / 1e9,
        note="bound: the weights and the KV of the prompt; Qwen's README: 16.99 (transformers, A100)")
    return out


def plot(figs: dict, path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(2, (len(figs) + 1) // 2, figsize=(4 * ((len(figs) + 1) // 2), 7))
    colors = {"qwenlm": "tab:blue", "transformers": "tab:orange", "bound": "0.6"}
    for ax, f in zip(axes.flat, figs.values()):
        names = [k for k in colors if f.get(k) is not None]
        bars = ax.bar(names, [f[k] for k in names], color=[colors[k] for k in names])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        better = "lower" if f["unit"] in ("ms", "GB") else "higher"
        ax.set_title(f"{f['label']}\n({f['unit']}, {better} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(figs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main() -> int:
    args, device, sizes, results, bw = start("bench_engine", __doc__, SIZES, TINY_SIZES, lambda ap: ap.add_argument(
        "--tp", type=int, default=1, metavar="N", help="tensor_parallel_size of the qwenlm engine (default 1)"))
    folder = checkpoint(args.workdir, "bf16", args.tiny, device)
    results["folder"], results["tensor_parallel_size"] = str(folder), args.tp
    runs = {"qwenlm": ("qwenlm", engine_part, folder, "auto", sizes, True, device, args.tp),
            "int8_kv": ("qwenlm_int8_kv", engine_part, folder, "int8", sizes, False, device, args.tp),
            "memory": ("memory", memory_part, folder, sizes, device),
            "transformers": ("transformers", transformers_part, folder, sizes, device)}
    parts = results["parts"] = {}
    for name in selected(args, list(runs)):
        key, fn, *fn_args = runs[name]
        parts[key] = isolated(device, fn, *fn_args)
    figs = results["figures"] = figures(parts, bw, folder, sizes)
    path = write_json(results, results_path("bench_engine", args.json))
    rows = []
    for f in figs.values():
        cell = f["qwenlm"]
        if cell is not None and f.get("spread"):
            cell = f"{cell:,.1f} ({f['spread'][0]:,.1f}-{f['spread'][1]:,.1f})"
        rows.append([f"{f['label']} ({f['unit']})", cell, f["transformers"], f["bound"], f["note"]])
    print_table(f"qwenlm vs transformers vs bound: {results['header']['device']}, qwenlm {results['header']['qwenlm']}",
                ["figure", "qwenlm", "transformers", "bound", "note"], rows)
    plot(figs, path.with_suffix(".png"), f"{results['header']['device']}, random weights at the "
                                         f"{'tiny' if args.tiny else 'Qwen-7B'} shape, bf16")
    return exit_code(parts)


if __name__ == "__main__":
    sys.exit(main())
