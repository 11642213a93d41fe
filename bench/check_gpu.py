"""The GPU correctness checks CI cannot run (it has no GPU): the Triton kernels against their torch references on
the device, and the engine's GPU path (CUDA graphs, compiled regions, overlapped steps) against itself without
them. Exits non-zero when a check fails.

  kernels      int8 KV store == its reference, and its dequantized rows == the pool read back (bf16, bit for bit);
               paged decode attention, the default kernel for batch 1, 4 and 32, bf16 pool (the new token's K/V
               stored by the call) and int8 pool == the reference
  act_order    a GPTQ layer with shuffled g_idx (desc_act) on the Triton kernel == the dequantize path
  fused_int4   the fused batch-1 Int4 step (qwenlm.engine.fused_decode, the engine's default for GPTQ Int4) == the
               model's own step: 2 layers at the Qwen-7B shape, 3 repeats (split-K sums land in any order)
  overlap      overlapped steps give the tokens and finish reasons of synchronous ones (sampling, stop ids,
               logprobs, n=2, preemptions), and no KV block is leaked
  compiled     the compiled regions serve prompts of 2-64 tokens, chunked, without a compile after engine start
               (GPU only: Inductor on the CPU takes minutes)
  logprobs     prompt, top-k and candidate-id logprobs through the engine's device path (graphs, compiled regions,
               chunked prefill, a prefix-cache hit) == a plain forward's log_softmax; top-k ids == torch.topk's
  train        a GPTQ Int4 layer's input gradient (Triton dequantize in backward) == the dense layer's; lm_loss (Liger's
               fused linear cross-entropy on CUDA) == causal_lm_loss: loss, hidden and lm_head gradients
  prefill_graphs  prompts alone (1-600 tokens, a prefix-cache hit), one arriving while another decodes, bf16 and
               int8 KV: through the prefill CUDA graphs == a plain forward's log_softmax, and the graphs served the
               short prompts
  tp           tensor parallelism through the engine: a split model's collectives in the CUDA graphs and compiled
               regions (one rank on NCCL, any GPU), and with 2+ GPUs visible `LLM(tensor_parallel_size=2)` (NCCL,
               graphs, compiled) == one process: greedy ids equal, logprobs reported (fp32). --tiny: 2 gloo ranks

    python bench/check_gpu.py            # H100: ~2 minutes
    python bench/check_gpu.py --tiny     # tiny shapes on the CPU, kernels in Triton's interpreter
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

if "--tiny" in sys.argv and os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton is imported
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "TRITON_INTERPRET": "1"})

import torch  # noqa: E402

from benchlib import arg_parser, checkpoint, device_of, header, log, print_table, results_path, selected, write_json  # noqa: E402


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_kernels(workdir, device, tiny) -> dict:
    from qwenlm.kernels.attention import paged_decode_attention, paged_decode_attention_ref
    from qwenlm.kernels.kv_int8 import dequantize_rows, quantize_store_kv, quantize_store_kv_ref
    g = torch.Generator(device).manual_seed(0)
    H, D, bs, ctx_blocks = (4, 64, 4, 6) if tiny else (32, 128, 16, 40)
    dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter's bf16 casts do not round as a GPU's do
    batches = (1, 4) if tiny else (1, 4, 32)
    nb = max(batches) * ctx_blocks + 1
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    # the store: K/V as the model hands them (v a strided slice of the fused projection)
    n = 40 if tiny else 2000
    k, v = rand(n, H, D) * 3, rand(n, 3, H, D)[:, 1]
    slots = torch.randperm(nb * bs, generator=g, device=device)[:n]
    pools = [torch.zeros(nb, bs, H, D, dtype=torch.uint8, device=device) for _ in range(2)]
    pools += [torch.zeros(nb, bs, H, 2, device=device) for _ in range(2)]
    ref = [t.clone() for t in pools]
    quantize_store_kv(k, v, *pools, slots, use_triton=True)
    quantize_store_kv_ref(k, v, *ref, slots)
    res = {"store_q_max_diff": max((a.int() - b.int()).abs().max().item() for a, b in zip(pools[:2], ref[:2])),
           "store_scale_zero_max_rel_diff": max(((a - b).abs() / b.abs().clamp(min=1e-6)).max().item()
                                               for a, b in zip(pools[2:], ref[2:]))}
    # the rows the store hands back dequantized (attention reads them instead of the pool) == reading the pool back,
    # bit for bit in the model's dtype (the interpreter tests cover fp16 only)
    again = [torch.zeros_like(t) for t in pools]
    rows = quantize_store_kv(k, v, *again, slots, use_triton=True, dequantized=True)
    res["store_dequantized_exact"] = all(
        torch.equal(r, dequantize_rows(c.view(-1, H, D)[slots], sz.view(-1, H, 2)[slots], dtype))
        for r, c, sz in zip(rows, again[:2], again[2:]))
    ok = res["store_q_max_diff"] <= 1 and res["store_scale_zero_max_rel_diff"] < 1e-3 and res["store_dequantized_exact"]
    # decode attention: every slot of the int8 pools holds data
    kq, vq = (torch.randint(0, 256, (nb, bs, H, D), generator=g, device=device, dtype=torch.uint8) for _ in range(2))
    ks, vs = (torch.rand(nb, bs, H, 2, generator=g, device=device) * torch.tensor([0.03, 50.0], device=device)
              + torch.tensor([1e-3, 100.0], device=device) for _ in range(2))
    for B in batches:
        tables = torch.randperm(nb - 1, generator=g, device=device)[:B * ctx_blocks].view(B, ctx_blocks).int()
        lens = torch.randint(1, ctx_blocks * bs + 1, (B,), generator=g, device=device).int()
        lens[0] = ctx_blocks * bs
        q = rand(B, H, D)
        kc, vc = rand(nb, bs, H, D), rand(nb, bs, H, D)
        kn, vn = rand(B, H, D), rand(B, 3, H, D)[:, 1]
        pos = (lens - 1).long()
        slot = tables.long()[torch.arange(B, device=device), pos // bs] * bs + pos % bs
        want_k, want_v = kc.clone(), vc.clone()
        want_k.view(-1, H, D)[slot], want_v.view(-1, H, D)[slot] = kn, vn
        out = paged_decode_attention(q, kc, vc, tables, lens, k_new=kn, v_new=vn, slots=slot)
        want = paged_decode_attention_ref(q.float(), want_k.float(), want_v.float(), tables, lens)
        res[f"bf16_b{B}_rel_err"] = rel_err(out, want)
        res[f"bf16_b{B}_store_exact"] = torch.equal(kc, want_k) and torch.equal(vc, want_v)
        out = paged_decode_attention(q, kq, vq, tables, lens, k_sz=ks, v_sz=vs)
        want = paged_decode_attention_ref(q.float(), kq, vq, tables, lens, k_sz=ks, v_sz=vs)
        res[f"int8_b{B}_rel_err"] = rel_err(out, want)
        ok &= res[f"bf16_b{B}_rel_err"] < 2e-2 and res[f"bf16_b{B}_store_exact"] and res[f"int8_b{B}_rel_err"] < 2e-2
    return {"ok": ok, **res}


def _random_int4_layer(g: torch.Generator, device, tiny: bool):
    """A GPTQ Int4 layer (group 128) with random packed weights: 256 x 128 tiny, else the 7B's 4096 x 4096."""
    from qwenlm.model import quant
    k, n = (256, 128) if tiny else (4096, 4096)
    layer = quant.GPTQLinear(k, n, 4, 128, device=device)
    layer.qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=g, device=device, dtype=torch.int32)
    layer.qzeros = quant.pack_cols(torch.randint(5, 10, (k // 128, n), generator=g, device=device), 4)
    layer.scales = (torch.rand(k // 128, n, generator=g, device=device) * 0.004 + 0.001).half()
    return layer, k, n


def check_act_order(workdir, device, tiny) -> dict:
    g = torch.Generator(device).manual_seed(1)
    layer, k, n = _random_int4_layer(g, device, tiny)
    layer.g_idx = (torch.randperm(k, generator=g, device=device) // 128).int()
    layer.bias.normal_(generator=g)
    x = torch.randn(3, 1, k, generator=g, device=device).half()
    ref = layer(x).float()  # the dequantize path
    layer.prepare_kernel()
    res = {f"m{m}_max_err": (layer(x[:m]).float() - ref[:m]).abs().max().item() for m in (1, 3)}
    tol = 2e-3 * ref.abs().max().item() + 2e-3
    return {"ok": all(e <= tol for e in res.values()), "tol": tol, **res}


def check_fused_int4(workdir, device, tiny) -> dict:
    from qwenlm.engine import compiled_decode, fused_decode
    from qwenlm.engine.fusion import fuse_gate_up
    from qwenlm.model import quant
    from qwenlm.model.loader import load_model
    from qwenlm.model.qwen import DenseKVCache
    folder = checkpoint(workdir, "int4", tiny, device, num_hidden_layers=2, vocab_size=4096)
    model = load_model(folder, device, progress=False)
    if device != "cuda":  # on a GPU the loader switches the layers to the kernels
        for m in model.modules():
            if isinstance(m, quant.GPTQLinear):
                m.prepare_kernel()
    fuse_gate_up(model)
    if not fused_decode.supports(model):
        return {"ok": False, "error": "fused_decode.supports() is False for a GPTQ Int4 model"}
    T = 12 if tiny else 40
    g = torch.Generator(device).manual_seed(2)
    ids = torch.randint(0, 4096, (1, T), generator=g, device=device)
    pos = torch.arange(T, device=device)[None]
    inv = model.inv_freq([1.0], device)

    with torch.no_grad():
        prefix = DenseKVCache(2)  # the first T - 1 tokens, copied for each step below (a step appends to it)
        prefix.begin(torch.ones(1, T - 1, dtype=torch.bool, device=device))
        model(ids[:, :-1], pos[:, :-1], prefix, inv, use_logn=True)
        prefix.begin(torch.ones(1, 1, dtype=torch.bool, device=device))
        ref = model(ids[:, -1:], pos[:, -1:], copy.deepcopy(prefix), inv, use_logn=True)[0, 0].float()
        x, cos, sin, qs = compiled_decode.prologue(model, ids[:, -1:], pos[:, -1:], inv, True)
        step = fused_decode.FusedInt4Blocks(model)
        outs = [model.transformer.ln_f(step(copy.deepcopy(prefix), x, cos, sin, qs))[0, 0].float()
                for _ in range(2 if tiny else 3)]
    res = {"vs_model_max_diff": max((o - ref).abs().max().item() for o in outs),
           "between_repeats_max_diff": max((o - outs[0]).abs().max().item() for o in outs),
           "tol": 4e-3 * ref.abs().max().item()}
    return {"ok": res["vs_model_max_diff"] <= res["tol"] and res["between_repeats_max_diff"] <= res["tol"], **res}


def _tiny_model(workdir, device):
    """A tiny float32 model for the engine checks (exactness and compiles, not speed)."""
    from qwenlm.model.loader import load_model
    return load_model(checkpoint(workdir, "bf16", True, device), device, torch.float32, progress=False)


def check_overlap(workdir, device, tiny) -> dict:
    from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
    model = _tiny_model(workdir, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (9, 30, 4, 17, 22, 6, 40, 3)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=40, logprobs=True),
              SamplingParams(temperature=0, max_tokens=33, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=6, max_tokens=50, stop_token_ids=[17, 400, 901]),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=7, max_tokens=45, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=0.9, seed=8, max_tokens=60, stop_token_ids=list(range(0, 1000, 37))),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    runs, leaked = {}, False
    for overlap in (True, False):
        for blocks in (256, 40):  # 40 blocks of 4 tokens: preemptions
            engine = LLMEngine(model, None, EngineConfig(overlap_steps=overlap, num_blocks=blocks, block_size=4,
                                                         max_num_batched_tokens=32, max_num_seqs=16,
                                                         compile_decode=False))
            outs = engine.generate(prompts, params)
            runs[overlap, blocks] = [[(o.token_ids, o.logprobs, o.finish_reason) for o in r.outputs] for r in outs]
            stats = engine.stats()
            leaked |= stats["num_free_blocks"] != stats["num_blocks"]
            del engine
    same, lp_diff = True, 0.0
    for blocks in (256, 40):
        for ra, rb in zip(runs[True, blocks], runs[False, blocks]):
            for (ta, la, fa), (tb, lb, fb) in zip(ra, rb):
                same &= ta == tb and fa == fb
                lp_diff = max([lp_diff] + [abs(x - y) for x, y in zip(la or [], lb or [])])
    # logprobs: the batches around a request may differ (a step's finishes are known one step later), so float
    # summation order may too; tokens and finish reasons must not
    return {"ok": same and not leaked, "same_tokens_and_finish": same, "blocks_leaked": leaked,
            "max_logprob_diff": lp_diff}


def check_compiled(workdir, device, tiny) -> dict:
    if device != "cuda":
        return {"ok": True, "skipped": "GPU only"}
    from torch._dynamo.utils import counters
    from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
    model = _tiny_model(workdir, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40, 5, 64, 2, 33)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs, after_start = {}, None
    for compiled in (True, False):
        engine = LLMEngine(model, None, EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=48,
                                                     max_num_seqs=8, compile_decode=compiled))
        graphs = counters["stats"]["unique_graphs"]
        outs[compiled] = [r.outputs[0].token_ids for r in engine.generate(prompts, greedy)]
        if compiled:
            after_start = counters["stats"]["unique_graphs"] - graphs
        del engine
    # tokens against the eager engine are reported, not required: Inductor's fused fp32 kernels may round differently
    return {"ok": after_start == 0, "graphs_compiled_after_start": after_start,
            "same_tokens_as_eager": outs[True] == outs[False]}


def check_tp(workdir, device, tiny) -> dict:
    import torch.distributed as dist
    from qwenlm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
    from qwenlm.parallel.model import load_tp_model
    folder = checkpoint(workdir, "bf16", True, device)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40, 5, 64, 2, 33)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
    kw = dict(num_blocks=256, block_size=4, max_num_batched_tokens=48, max_num_seqs=8)

    def run(engine, key):
        outs = [r.outputs[0] for r in engine.generate(prompts, greedy)]
        res[key + "_same_tokens"] = [o.token_ids for o in outs] == [o.token_ids for o in ref]
        res[key + "_max_logprob_diff"] = max(abs(a - b) for o, r in zip(outs, ref) for a, b in zip(o.logprobs, r.logprobs))
        res[key + "_graphs"] = len(engine.runner.graphs)

    res = {}
    ref = [r.outputs[0] for r in LLMEngine(_tiny_model(workdir, device), None, EngineConfig(**kw)).generate(prompts, greedy)]
    if device == "cuda":  # one rank: the split model's hooks run their NCCL collectives inside graphs and compiles
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
        try:
            run(LLMEngine(load_tp_model(folder, 0, 1, device, torch.float32, progress=False), None,
                          EngineConfig(**kw)), "one_rank")
        finally:
            dist.destroy_process_group()
    world = torch.cuda.device_count() if device == "cuda" else 2
    if world >= 2:
        llm = LLM(str(folder), tensor_parallel_size=2, device=device, dtype=torch.float32, **kw)
        try:
            run(llm, "two_ranks")
        finally:
            llm.shutdown()
    else:
        res["two_ranks"] = "skipped: one GPU visible"
    res["ok"] = all(v for k, v in res.items() if k.endswith("same_tokens"))
    return res


def _direct_log_softmax(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """log_softmax [len(ids), V] of one plain forward (dense cache, alpha from the prompt length), fp32."""
    from qwenlm.model.qwen import DenseKVCache, ntk_alpha
    cfg, device = model.config, model.lm_head.weight.device
    alpha = ntk_alpha(prompt_len, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    x = torch.tensor([ids], device=device)
    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(torch.ones_like(x, dtype=torch.bool))
    with torch.inference_mode():
        hidden = model(x, torch.arange(len(ids), device=device)[None], cache, model.inv_freq([alpha], device))
        return model.logits(hidden)[0].float().log_softmax(-1)


def check_logprobs(workdir, device, tiny) -> dict:
    """Prompt, top-k and candidate-id logprobs through the engine's device path (CUDA graphs and compiled regions on
    a GPU, chunked prefill, prefix-cache hits) == a plain forward's log_softmax; top-k ids == torch.topk's."""
    from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
    model = _tiny_model(workdir, device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (300, 40, 150, 90)]
    prompts.append(prompts[0][:200] + prompts[1])  # a prefix-cache hit (prompt logprobs recompute it)
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=3, logprobs=True,
                             top_logprobs=2, candidate_token_ids=[5, 7, 9]),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=2, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=4,
                             prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, candidate_token_ids=[1]),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)]
    res, ok = {}, True
    for compiled in ((False, True) if device == "cuda" else (False,)):
        engine = LLMEngine(model, None, EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=128,
                                                     max_num_seqs=8, compile_decode=compiled))
        outs = engine.generate(prompts[:1], params[:1]) + engine.generate(prompts[1:], params[1:])
        worst, topk_same = 0.0, True
        for p, sp, o in zip(prompts, params, outs):
            c = o.outputs[0]
            lsm = _direct_log_softmax(model, p + c.token_ids, len(p)).cpu()
            if sp.prompt_logprobs is not None:
                want = lsm[:len(p) - 1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
                worst = max(worst, (torch.tensor(o.prompt_logprobs[1:]) - want).abs().max().item())
                if sp.prompt_logprobs:
                    top = torch.topk(lsm[:len(p) - 1], sp.prompt_logprobs, dim=1).indices.tolist()
                    topk_same &= all(list(d) == t for d, t in zip(o.prompt_top_logprobs[1:], top))
            gen = lsm[len(p) - 1:-1]
            if c.logprobs is not None:
                got = torch.tensor(c.logprobs[:len(c.token_ids)])
                worst = max(worst, (got - gen.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]).abs().max().item())
            if c.candidate_logprobs is not None:
                got = torch.tensor([[row[i] for i in sp.candidate_token_ids] if isinstance(row, dict) else row
                                    for row in c.candidate_logprobs[:len(c.token_ids)]])
                worst = max(worst, (got - gen[:, sp.candidate_token_ids]).abs().max().item())
            if c.top_logprobs is not None:
                top = torch.topk(gen, sp.top_logprobs, dim=1).indices.tolist()
                topk_same &= all(list(d) == t for d, t in zip(c.top_logprobs, top))
        res[f"compiled_{compiled}_max_abs_err"] = worst
        res[f"compiled_{compiled}_topk_ids_equal"] = topk_same
        ok &= worst < 1e-3 and topk_same  # fp32 model: kernels' summation order only
        del engine
    return {"ok": ok, **res}


def check_train(workdir, device, tiny) -> dict:
    """The training paths that run differently on a GPU: a GPTQ Int4 layer's input gradient (Triton dequantize in
    backward) == the dense layer's, and lm_loss (Liger's fused linear cross-entropy on CUDA) == causal_lm_loss, loss
    and gradients."""
    from qwenlm.train.loss import causal_lm_loss, lm_loss
    g = torch.Generator(device).manual_seed(4)
    layer, k, n = _random_int4_layer(g, device, tiny)
    layer.prepare_kernel()
    dtype = torch.float32 if tiny else torch.bfloat16
    x = torch.randn(2, 64, k, generator=g, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(2, 64, n, generator=g, device=device, dtype=dtype)
    (layer(x).float() * up).sum().backward()
    w = layer.dequantized_weight(torch.float32)  # [k,n]
    xd = x.detach().float().requires_grad_(True)
    ((xd @ w) * up.float()).sum().backward()
    res = {"gptq_grad_x_rel_err": rel_err(x.grad, xd.grad)}

    class Head(torch.nn.Module):  # what lm_loss reads of a model: its lm_head
        def __init__(self, weight):
            super().__init__()
            self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.lm_head.weight = torch.nn.Parameter(weight)

    vocab, hid, t = (1000, 64, 96) if tiny else (151936, 4096, 2048)
    weight = (torch.randn(vocab, hid, generator=g, device=device) * 0.02).to(dtype)
    hidden = torch.randn(1, t, hid, generator=g, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (1, t), generator=g, device=device)
    labels[:, : t // 4] = -100
    grads = []
    for fused in (True, False):
        head, h = Head(weight.clone()), hidden.clone().requires_grad_(True)
        loss = lm_loss(head, h, labels) if fused else causal_lm_loss(head.lm_head(h), labels)
        loss.backward()
        grads.append((loss.detach().float(), h.grad, head.lm_head.weight.grad))
    res["lm_loss_rel_err"] = ((grads[0][0] - grads[1][0]).abs() / grads[1][0].abs()).item()
    res["lm_loss_grad_hidden_rel_err"] = rel_err(grads[0][1], grads[1][1])
    res["lm_loss_grad_head_rel_err"] = rel_err(grads[0][2], grads[1][2])
    tol = 1e-4 if tiny else 2e-2  # bf16 on the GPU
    return {"ok": all(v < tol for v in res.values()), "tol": tol, **res}


def check_prefill_graphs(workdir, device, tiny) -> dict:
    """Prompts alone (1 to 600 tokens, one a prefix-cache hit), one arriving while another decodes, and int8 KV:
    through the prefill CUDA graphs (qwenlm.engine.prefill_graphs) == a plain forward's log_softmax, and the graphs
    served the short ones."""
    from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
    model = _tiny_model(workdir, device)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (1, 5, 16, 17, 100, 512, 600, 30)]
    prompts.insert(5, prompts[4][:64] + [3, 4, 5])  # a prefix-cache hit of 64 tokens: recomputed in a graph
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)
    res, ok = {}, True
    for kv in ("auto", "int8"):
        engine = LLMEngine(model, None, EngineConfig(num_blocks=512, block_size=16, max_num_batched_tokens=1024,
                                                     max_num_seqs=8, kv_cache_dtype=kv))
        graphs, hits = engine.runner.prefill_graphs, []
        if graphs is not None:
            for size, replay in list(graphs.replay.items()):
                graphs.replay[size] = lambda size=size, replay=replay: (hits.append(size), replay())
        outs = [engine.generate([p], greedy)[0] for p in prompts[:-1]]
        # the last prompt arrives while the one before it decodes
        a = engine.add_request(None, prompts[-2], greedy)
        engine.step()
        b = engine.add_request(None, prompts[-1], greedy)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[-1:] = [done[a], done[b]]
        worst = 0.0
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            lsm = _direct_log_softmax(model, p + c.token_ids, len(p)).cpu()[len(p) - 1:-1]
            got = torch.tensor(c.logprobs[:len(c.token_ids)])
            worst = max(worst, (got - lsm.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]).abs().max().item())
        res[f"{kv}_max_abs_err"], res[f"{kv}_graph_sizes_used"] = worst, sorted(set(hits))
        # int8 KV: the stored rows are quantized, so the logprobs differ from the plain forward's by that
        ok &= worst < (1e-3 if kv == "auto" else 0.1) and (device != "cuda" or len(set(hits)) >= 3)
        del engine
    return {"ok": ok, **res}


CHECKS = {"kernels": check_kernels, "act_order": check_act_order, "fused_int4": check_fused_int4,
          "overlap": check_overlap, "compiled": check_compiled, "tp": check_tp, "logprobs": check_logprobs,
          "train": check_train, "prefill_graphs": check_prefill_graphs}


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    device = device_of(args)
    if args.tiny:  # numpy overflow warnings of Triton's interpreter on the packed int32 words; results are checked
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    results = {"name": "check_gpu", "header": header(device), "checks": {}}
    log(" | ".join(f"{k} {v}" for k, v in results["header"].items()))
    for name in selected(args, list(CHECKS)):
        t = time.time()
        try:
            r = CHECKS[name](args.workdir, device, args.tiny)
        except Exception as e:  # noqa: BLE001 (a check that cannot run has failed)
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:1000]}"}
        r["seconds"] = time.time() - t
        results["checks"][name] = r
        log(f"{name}: {'ok' if r['ok'] else 'FAILED'} {r}")
        if device == "cuda":
            torch.cuda.empty_cache()
    write_json(results, results_path("check_gpu", args.json))
    rows = [[name, "ok" if r["ok"] else "FAILED", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in r.items() if k not in ("ok", "seconds"))]
            for name, r in results["checks"].items()]
    print_table(f"GPU checks: {results['header']['device']}, qwenlm {results['header']['qwenlm']}",
                ["check", "result", "note"], rows)
    return 0 if all(r["ok"] for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
