"""Batch-1 Int4 decode with the decode attention sending the first MiB of the MLP's gate_up weights into L2
(`paged_decode_attention(prefetch=)`, fused_decode.PREFETCH_MB), several amounts alternating in one process, each
request's greedy tokens compared with the first amount's; then the registers and shared memory of the step's
Triton kernels. At batch 1 most of the attention's programs read little or nothing, and the prefetch is issued
before they wait for c_attn. --settings also varies the batch-1 attention's launch (splits, tile, stages, min_chunk).

    PYTHONPATH=.:bench python bench/bench_attn_prefetch.py --mib 0,16,32
    PYTHONPATH=.:bench python bench/bench_attn_prefetch.py --settings "mib=16;mib=16,attn_block=32,min_chunk=32"
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench_quant import build_model, greedy, prompts_of, run_timed
from benchlib import log, save_json
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, fused_decode
from qwenlm.kernels import attention, attention_config, gptq_fused


def decode_rate(model, prompt_len, new_tokens, seed=2):
    """Greedy batch-1 decode tok/s through the engine (CUDA graphs, compiled decode) after a warm-up request, and
    the tokens of another 64-token request."""
    bs = 16
    engine = LLMEngine(model, None, EngineConfig(num_blocks=(prompt_len + new_tokens) // bs + 2, block_size=bs,
                                                 max_num_batched_tokens=max(prompt_len, 256), max_num_seqs=1,
                                                 cuda_graph_batch_sizes=[1], compile_decode=True))
    run_timed(engine, prompts_of(1, prompt_len, model.config.vocab_size, 1), greedy(16))
    _, dec_s, dec_tok = run_timed(engine, prompts_of(1, prompt_len, model.config.vocab_size, seed),
                                  greedy(new_tokens))
    out = engine.generate([prompts_of(1, prompt_len, model.config.vocab_size, 3)[0]], greedy(64))[0].outputs[0]
    del engine
    return dec_tok / dec_s, list(out.token_ids)


def kernel_resources():
    """Registers, spills and shared memory of every compiled variant of the fused GEMV and the mma attention."""
    out = []
    for name, fn in (("fused_int4", gptq_fused._fused_int4_kernel),
                     ("attention_mma", attention._paged_decode_mma_kernel)):
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                row = dict(kernel=name, regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                           warps=k.metadata.num_warps, stages=k.metadata.num_stages)
                out.append(row)
                log(f"{name}: {row['regs']} registers, {row['spills']} spilled, {row['shared']} B shared, "
                    f"{row['warps']} warps, {row['stages']} stages")
    return out


ATTN_BATCH1 = attention_config.DECODE_CONFIGS["bf16"][0]
ATTN_PARTIALS = attention_config.PARTIALS_BATCH1
PREFETCH_MB = fused_decode.PREFETCH_MB
X_PAIRS = gptq_fused.X_PAIRS
FUSED_DEFAULT = gptq_fused.FUSED_DEFAULT
FUSED_CONFIGS = dict(gptq_fused.FUSED_CONFIGS)
PRELOAD = attention.PRELOAD
ALIGN_RUNS = gptq_fused.ALIGN_RUNS
PARTIALS = fused_decode.PARTIALS


def apply(run: dict) -> None:
    """A setting of --settings: gate_up's MiB prefetched by the attention, the batch-1 attention's settings (and
    whether it loads its first K/V tile before its wait, `attention.PRELOAD`), how the
    fused GEMVs get their inputs' lane pairs (`gptq_fused.X_PAIRS`) and their launch (`gptq_fused.FUSED_DEFAULT`,
    and per shape `FUSED_CONFIGS`); an empty setting is the product's."""
    fused_decode.PREFETCH_MB = int(run.get("mib", PREFETCH_MB))
    attention.PRELOAD = bool(int(run.get("preload", PRELOAD)))
    gptq_fused.X_PAIRS = int(run.get("xpairs", X_PAIRS))
    gptq_fused.ALIGN_RUNS = bool(int(run.get("align", ALIGN_RUNS)))
    fused_decode.PARTIALS = bool(int(run.get("partials", PARTIALS)))
    gptq_fused.FUSED_DEFAULT = tuple(map(int, run["fused"].split("/"))) if "fused" in run else FUSED_DEFAULT
    gptq_fused.FUSED_CONFIGS.clear()
    gptq_fused.FUSED_CONFIGS.update(FUSED_CONFIGS)
    for spec in filter(None, run.get("shape", "").split("+")):  # N/K/BN/BK/PER_SM/WARPS/STAGES
        n, k, *cfg = map(int, spec.split("/"))
        gptq_fused.FUSED_CONFIGS[(n, k)] = tuple(cfg)
    def attn(cfg):  # the batch-1 attention settings, over the table's (partials=0) or PARTIALS_BATCH1
        return dataclasses.replace(
            cfg, kernel=run.get("attn_kernel", cfg.kernel), splits=int(run.get("splits", cfg.splits)),
            num_stages=int(run.get("attn_stages", cfg.num_stages)), block_n=int(run.get("attn_block", cfg.block_n)),
            min_chunk=int(run.get("min_chunk", cfg.min_chunk)))
    attention_config.DECODE_CONFIGS["bf16"][0] = (ATTN_BATCH1[0], attn(ATTN_BATCH1[1]))
    attention_config.PARTIALS_BATCH1 = attn(ATTN_PARTIALS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="0,16,32", help="MiB of gate_up prefetched, one run each per repeat")
    ap.add_argument("--settings", default="", help='instead of --mib: "mib=16,splits=S,attn_stages=S,'
                    'attn_block=B,attn_kernel=mma|v2,preload=0|1,align=0|1,partials=0|1,'
                    'min_chunk=C,xpairs=X,fused=BN/BK/PER_SM/WARPS/STAGES,shape=N/K/BN/BK/PER_SM/'
                    'WARPS/STAGES+...;...": per run the prefetch, the batch-1 attention\'s settings, the fused GEMVs\' '
                    'input pairs and launch (all shapes, or per N x K)')
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = build_model(ModelConfig(), "int4", "cuda", torch.float16)
    if args.settings:
        runs = [dict(kv.split("=") for kv in v.split(",")) for v in args.settings.split(";")]
    else:
        runs = [dict(mib=v) for v in args.mib.split(",")]
    rows, first = [], None
    for _ in range(args.repeats):
        for run in runs:
            apply(run)
            t = time.time()
            tps, toks = decode_rate(model, args.prompt, args.new_tokens)
            first = first or toks
            rows.append(dict(setting=run, tok_s=tps, same_tokens=toks == first))
            log(f"{run}: {tps:6.1f} tok/s, tokens as the first run's: {toks == first}  ({time.time() - t:.0f} s)")
    apply({})  # every setting back to the product's
    save_json(dict(prompt=args.prompt, rows=rows, kernels=kernel_resources()), "bench_attn_prefetch.json")


if __name__ == "__main__":
    main()
