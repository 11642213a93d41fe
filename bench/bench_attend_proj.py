"""Batch-1 Int4 decode with the attention inside attn c_proj's launch (`fused_int4_gemv(attention=)`, the engine's
default) against the attention kernel followed by c_proj (QWENLM_ATTEND_IN_PROJ=0), alternating in one process:

  1. the GPU kernel against the reference (paged_decode_attention_ref, the dequantized c_proj) at the real shape,
     contexts 1 to 4,096;
  2. greedy tokens of the two paths through the engine (2 layers, 3 prompts);
  3. decode tok/s at the Qwen-7B shape, prompts of 16 (bench_quant's batch-1 run: contexts 16-272), 1,024 and
     3,072 tokens, with the bandwidth bound.

    PYTHONPATH=.:bench python bench/bench_attend_proj.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench_quant import agree_tokens, build_model, greedy, prompts_of, run_timed, streamed_bytes
from benchlib import copy_bandwidth, log, save_json
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, fused_decode
from qwenlm.kernels import gptq_fused
from qwenlm.kernels.attention import paged_decode_attention_ref


def check_kernel(model, device="cuda"):
    """Layer 0's c_proj with the attention prologue against attention then the dequantized matmul."""
    lin = model.transformer.h[0].attn.c_proj
    heads, D, page = 32, 128, 16
    K = heads * D
    worst = 0.0
    for ctx_len in (1, 17, 272, 1000, 4096):
        nb = (ctx_len + page - 1) // page + 3
        kc = torch.randn(nb, page, heads, D, device=device, dtype=torch.float16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device=device, dtype=torch.int32)[None]
        cl = torch.tensor([ctx_len], device=device, dtype=torch.int32)
        pos = ctx_len - 1
        slot = (bt[0, pos // page].long() * page + pos % page)[None]
        qkv = torch.randn(3 * K, device=device, dtype=torch.float16)
        res = torch.randn(K, device=device, dtype=torch.float16)
        kc2, vc2 = kc.clone(), vc.clone()
        q, k, v = qkv.view(3, heads, D)
        kc2.view(-1, heads, D)[slot] = k
        vc2.view(-1, heads, D)[slot] = v
        o = paged_decode_attention_ref(q[None], kc2, vc2, bt, cl)[0].reshape(-1)
        want = ((o.float() @ lin.dequantized_weight()).half().float() + res.float()).half().float()
        got = gptq_fused.fused_int4_gemv(qkv, lin, residual=res, attention=(kc, vc, bt, cl, slot))[0].float()
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "the new K/V row is stored at its slot"
        assert err <= 4e-3, (ctx_len, err)
        worst = max(worst, err)
    log(f"kernel vs reference: max |diff| / max |want| {worst:.2e} (contexts 1-4096)")
    return worst


def decode_rate(model, prompt_len, new_tokens, seed=2):
    bs = 16
    engine = LLMEngine(model, None, EngineConfig(num_blocks=(prompt_len + new_tokens) // bs + 2, block_size=bs,
                                                 max_num_batched_tokens=max(prompt_len, 256), max_num_seqs=1,
                                                 cuda_graph_batch_sizes=[1], compile_decode=True))
    run_timed(engine, prompts_of(1, prompt_len, model.config.vocab_size, 1), greedy(16))  # warm-up
    _, dec_s, dec_tok = run_timed(engine, prompts_of(1, prompt_len, model.config.vocab_size, seed),
                                  greedy(new_tokens))
    del engine
    return dec_tok / dec_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="16,1024,3072")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--att-n", type=int, default=gptq_fused.ATT_N, help="context positions per attention tile")
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args()
    cfg = ModelConfig()
    bw = copy_bandwidth("cuda")
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    gptq_fused.ATT_N = args.att_n
    model = build_model(cfg, "int4", "cuda", torch.float16)
    results = dict(att_n=args.att_n)
    on0 = fused_decode.ATTEND_IN_PROJ
    if not args.skip_checks:
        results["kernel_err"] = check_kernel(model)
        tokens = agree_tokens(dataclasses.replace(cfg, num_hidden_layers=2), [False, True],
                              lambda on: setattr(fused_decode, "ATTEND_IN_PROJ", on))
        log(f"engine greedy, attention in c_proj vs separate: {tokens[0]}; separate vs separate: {tokens[1]}")
        results["tokens"] = tokens
    per_tok = streamed_bytes(model)
    rows = []
    for plen in (int(p) for p in args.prompts.split(",")):
        kv = 2 * cfg.num_hidden_layers * cfg.hidden_size * 2 * (plen + args.new_tokens / 2)
        bound = bw / (per_tok + kv)
        for on in [False, True] * args.repeats:
            fused_decode.ATTEND_IN_PROJ = on
            t = time.time()
            tps = decode_rate(model, plen, args.new_tokens)
            rows.append(dict(prompt=plen, attend_in_proj=on, tok_s=tps, bound_tok_s=bound))
            log(f"prompt {plen:5d} +{args.new_tokens}: attention {'in c_proj' if on else 'separate '} "
                f"{tps:6.1f} tok/s   bound {bound:5.0f}   ({time.time() - t:.0f} s)")
    fused_decode.ATTEND_IN_PROJ = on0
    results["rates"] = rows
    save_json(results, "bench_attend_proj.json")


if __name__ == "__main__":
    main()
