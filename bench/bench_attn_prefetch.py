"""Batch-1 Int4 decode with the MLP's gate_up weights sent into L2 ahead of gate_up, several amounts alternating in
one process: by the decode attention (`paged_decode_attention(prefetch=)`, fused_decode.PREFETCH_MB / PREFETCH_MODE)
or by attn c_proj while it waits for the attention (`fused_int4_gemv(prefetch=)`, PROJ_PREFETCH_MB). At batch 1
most of the attention's programs read little or nothing and memory sits idle from the attention to gate_up's start.

    PYTHONPATH=.:bench python bench/bench_attn_prefetch.py --variants "0,1,0;16,1,0;0,1,16"
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_quant import build_model, greedy, prompts_of, run_timed
from benchlib import log, save_json
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, fused_decode
from qwenlm.kernels import gptq_fused


def decode_rate(model, prompt_len, new_tokens, seed=2):
    """Greedy batch-1 decode tok/s through the engine (CUDA graphs, compiled decode) after a warm-up request."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="0,1,0;16,1,0;0,1,16;0,1,32", help='"MB,mode,MB2[,S];..." (MB from '
                    'the attention, mode 1 before it waits, 2 after; MB2 from attn c_proj before it waits; S: attn '
                    'c_proj\'s fused setting bn:bk:per_sm:warps:stages; R: every fused '
                    'GEMV\'s register limit, 0 none)')
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = build_model(ModelConfig(), "int4", "cuda", torch.float16)
    variants = [tuple((p := v.split(",")) + ["0", "1", "0", "", "0"][len(p):]) for v in args.variants.split(";")]
    rows, tokens = [], {}
    for _ in range(args.repeats):
        for v in variants:
            mb, mode, mb2 = (int(x) for x in v[:3])
            fused_decode.PREFETCH_MB, fused_decode.PREFETCH_MODE, fused_decode.PROJ_PREFETCH_MB = mb, mode, mb2
            gptq_fused.FUSED_CONFIGS.pop((4096, 4096), None)
            gptq_fused.MAXNREG = int(v[4])
            if v[3]:
                gptq_fused.FUSED_CONFIGS[(4096, 4096)] = tuple(int(x) for x in v[3].split(":"))
            t = time.time()
            tps, toks = decode_rate(model, args.prompt, args.new_tokens)
            tokens.setdefault(v, toks)
            same = toks == tokens[variants[0]]
            rows.append(dict(mb=mb, mode=mode, mb_c_proj=mb2, c_proj_setting=v[3], maxnreg=int(v[4]), tok_s=tps,
                             same_tokens=same))
            log(f"gate_up prefetch: attention {mb:3d} MiB mode {mode}, c_proj {mb2:3d} MiB, c_proj setting "
                f"{v[3] or 'default'}, maxnreg {v[4]}: {tps:6.1f} tok/s  "
                f"tokens as the first: {same}  "
                f"({time.time() - t:.0f} s)")
    save_json(dict(rows=rows, kernels=kernel_resources()), "bench_attn_prefetch.json")


def kernel_resources():
    """Registers, spills and shared memory of every compiled variant of the decode step's Triton kernels."""
    from qwenlm.kernels import attention
    out = []
    for name, fn in (("fused_int4", gptq_fused._fused_int4_kernel), ("attention_mma", attention._paged_decode_mma_kernel)):
        for cache in fn.device_caches.values():
            for key, k in cache[0].items():
                row = dict(kernel=name, regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                           warps=k.metadata.num_warps, stages=k.metadata.num_stages)
                out.append(row)
                log(f"{name}: {row['regs']} registers, {row['spills']} spilled, {row['shared']} B shared, "
                    f"{row['warps']} warps, {row['stages']} stages")
    return out


if __name__ == "__main__":
    main()
