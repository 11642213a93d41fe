"""Engine benchmark: qwenlm vs transformers `generate` vs the memory-bandwidth bound, side by side.

Random weights at the Qwen-7B shape (real config, 151,936 vocab, bf16) built directly on the GPU.
Prints, per figure, tokens/s (or ms / GB), achieved GB/s and the bound from a measured device-to-device
copy. Writes engine_bench.json and a batch-size sweep (PNG via matplotlib, else CSV) into $OUT (or ./).

    python bench/bench_engine.py            # on the GPU (about 6 minutes)
    python bench/bench_engine.py --tiny     # a tiny model on CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from benchlib import OUT, T0, copy_bandwidth, log, save_json, sync
from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
from qwenlm.model.qwen import QWenLMHeadModel

RESULTS: dict = {}
TOKENS: dict = {}  # (tag, figure) -> output token ids of that run


def save():
    save_json(RESULTS, "engine_bench.json")


def bench_attention_kernel(cfg: ModelConfig, dev, bw):
    """The Triton paged decode kernel alone at batch 128, context 640 (one layer), for several tile sizes."""
    if dev.type != "cuda":
        return
    from qwenlm.kernels.attention import paged_decode_attention
    B, ctx, bs, H, D = 128, 640, 16, cfg.num_attention_heads, cfg.head_dim
    nblk = B * ctx // bs
    kc = torch.randn(nblk + 1, bs, H, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(nblk, device=dev).view(B, ctx // bs).int()
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * B * ctx * H * D * 2
    res = {}
    for block_n in (16, 32, 64, 128):
        for _ in range(3):
            paged_decode_attention(q, kc, vc, tables, lens, block_n=block_n)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            paged_decode_attention(q, kc, vc, tables, lens, block_n=block_n)
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1e3 / 20
        res[block_n] = dict(us=sec * 1e6, gb_s=nbytes / sec / 1e9)
        log(f"paged decode kernel B={B} ctx={ctx} BLOCK_N={block_n}: {sec * 1e6:.0f} us, {nbytes / sec / 1e9:.0f} GB/s "
            f"(copy {bw / 1e9:.0f})")
    RESULTS["attention_kernel"] = res
    del kc, vc


def tiny_model(dev) -> QWenLMHeadModel:
    """A tiny fp32 model for the checks of the GPU path (exactness, compiles), not for speed."""
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      kv_channels=16, intermediate_size=256)
    return build_qwen(cfg, dev, torch.float32)


def check_overlap_gpu(dev):
    """Overlapped vs synchronous steps on the GPU path (CUDA graphs, pinned staging, tokens fed on the device):
    a tiny model, mixed requests with stop ids, sampling, logprobs, preemption; outputs must be identical."""
    if dev.type != "cuda":
        return
    model = tiny_model(dev)
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
    res = {}
    for overlap in (True, False):
        for blocks in (256, 40):  # 40 blocks of 4: preemptions
            engine = LLMEngine(model, None, EngineConfig(overlap_steps=overlap, num_blocks=blocks, block_size=4,
                                                         max_num_batched_tokens=32, max_num_seqs=16,
                                                         compile_decode=False))
            outs = engine.generate(prompts, params)
            res[overlap, blocks] = [[(o.token_ids, o.logprobs, o.finish_reason) for o in r.outputs] for r in outs]
            assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
            del engine
    same, lp_diff = True, 0.0
    for blocks in (256, 40):
        for ra, rb in zip(res[True, blocks], res[False, blocks]):
            for (ta, la, fa), (tb, lb, fb) in zip(ra, rb):
                same &= ta == tb and fa == fb
                lp_diff = max([lp_diff] + [abs(x - y) for x, y in zip(la or [], lb or [])])
    # logprobs: the batches around a request may differ (a step's finishes are known one step later), so
    # float summation order may too; tokens and finish reasons must not.
    RESULTS["overlap_tiny_gpu"] = dict(same_tokens=same, max_logprob_diff=lp_diff)
    log(f"tiny model on the GPU path: overlapped steps give identical tokens and finish reasons: {same}; "
        f"max logprob difference {lp_diff:.2e}")
    del model


def check_compiled_prefill_gpu(dev):
    """On the GPU: the prefill regions are compiled at engine start and serve prompts of every length (chunked,
    several per step) without another compile; tokens against the eager engine (logged, not asserted: Inductor's
    fused fp32 kernels may round differently)."""
    if dev.type != "cuda":
        return
    from torch._dynamo.utils import counters
    model = tiny_model(dev)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40, 5, 64, 2, 33)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for compiled in (True, False):
        engine = LLMEngine(model, None, EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=48,
                                                     max_num_seqs=8, compile_decode=compiled))
        graphs = counters["stats"]["unique_graphs"]
        outs[compiled] = [r.outputs[0].token_ids for r in engine.generate(prompts, greedy)]
        if compiled:
            RESULTS["compiled_prefill_recompiles"] = counters["stats"]["unique_graphs"] - graphs
        del engine
    RESULTS["compiled_prefill_same_tokens"] = outs[True] == outs[False]
    log(f"tiny model, compiled regions on the GPU: graphs compiled after engine start "
        f"{RESULTS['compiled_prefill_recompiles']} (prompts of 2-64 tokens, chunks of up to 48); tokens equal "
        f"to the eager engine: {outs[True] == outs[False]}")
    del model


def build_qwen(cfg: ModelConfig, dev, dtype) -> QWenLMHeadModel:
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = QWenLMHeadModel(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def streamed_weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight except the embedding table (one row of it is read)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wte" not in n)


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.hidden_size * dtype.itemsize


def prompts_of(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 150000), (length,), generator=g).tolist() for _ in range(n)]


def run_timed(engine: LLMEngine, prompts, params):
    """Run to completion; returns (wall s, time of decode steps s, decode tokens, first-output latency s)."""
    ids = [engine.add_request(None, p, params) for p in prompts]
    sync(engine.runner.device)
    t0 = time.perf_counter()
    first = None
    decode_s, decode_tokens = 0.0, 0
    final = {}
    while engine.has_unfinished():
        ts = time.perf_counter()
        outs = engine.step()
        final.update((o.request_id, o.outputs[0].token_ids) for o in outs if o.finished)
        dt = time.perf_counter() - ts  # step() ends with a host read of the sampled ids of the step it processed
        if not engine.last_step_was_prefill:
            decode_s += dt
            decode_tokens += len(outs)
        if first is None and outs:
            first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    assert not set(ids) & set(engine.requests)
    run_timed.last_tokens = [final[i] for i in ids]  # for comparing engine configurations token for token
    return wall, decode_s, decode_tokens, first


def step_timing(engine: LLMEngine, prompts, params, profile: bool = False):
    """Per decode step: wall time of engine.step() and GPU time of the graph replay (CUDA events), i.e. the
    host gap the GPU idles through (about 0 when steps overlap: the host works while the next step runs);
    with profile=True also the top kernels of those steps."""
    runner = engine.runner
    events = []
    replays = {}
    for bs, graph in runner.graphs.items():
        def replay(graph=graph):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.__class__.replay(graph)
            b.record()
            events.append((a, b))
        replays[bs] = graph.replay
        graph.replay = replay
    for p in prompts:
        engine.add_request(None, p, params)
    walls = []
    prof, profiling = None, False
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            if not engine.last_step_was_prefill:
                walls.append(dt)
            if prof is not None and len(walls) == 8 and not profiling:
                prof.__enter__()
                profiling = True
            if profiling and len(walls) == 24:
                prof.__exit__(None, None, None)
                profiling = False
    finally:
        for bs, graph in runner.graphs.items():
            del graph.replay
    gpu = [a.elapsed_time(b) / 1e3 for a, b in events]
    wall, g = statistics.median(walls[2:]), statistics.median(gpu[2:])
    table = None
    if prof is not None:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    return dict(wall_ms=wall * 1e3, gpu_ms=g * 1e3, host_gap_ms=(wall - g) * 1e3), table


def bench_variants(model, cfg, dev, bw, args):
    """Batch-1 decode for each change on its own: eager graphs, + gate_up fusion, + compiled regions with
    cuBLAS GEMVs, + Triton GEMVs (Inductor coordinate descent); per-step host gap; kernel profiles."""
    if dev.type != "cuda":
        return
    from qwenlm.engine import compiled_decode
    wbytes = streamed_weight_bytes(model)
    per_tok = wbytes + 80 * kv_bytes_per_token(cfg, model.lm_head.weight.dtype)
    cublas = {**compiled_decode.INDUCTOR_OPTIONS, "coordinate_descent_tuning": False}
    variants = [("eager graphs, w1/w2", dict(compile_decode=False, fuse_mlp=False), None, True),
                ("eager graphs, gate_up", dict(compile_decode=False), None, True),
                ("compiled, cuBLAS GEMV", dict(compile_decode=True), cublas, True),
                ("compiled, Triton, SiLU in c_proj", dict(compile_decode=True), None, False),
                ("compiled, Triton GEMV, steps not overlapped", dict(compile_decode=True, overlap_steps=False), None,
                 True),
                ("compiled, Triton GEMV", dict(compile_decode=True), None, True)]
    variants = [v for v in variants if v[0] in args.variants]
    res = RESULTS.setdefault("b1_variants", {})
    default_options = compiled_decode.INDUCTOR_OPTIONS
    for name, kw, options, split_act in variants:
        compiled_decode.INDUCTOR_OPTIONS = options or default_options
        compiled_decode.SPLIT_MLP_ACT = split_act
        try:
            t = time.time()
            engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, cuda_graph_batch_sizes=[1], num_blocks=64,
                                                         max_num_batched_tokens=512, **kw))
            build = time.time() - t
            params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            engine.generate([prompts_of(1, 16, cfg.vocab_size, 1)[0]], SamplingParams(temperature=0, max_tokens=8))
            profile = name == "eager graphs, w1/w2"  # profiler overhead would blur the host gaps compared here
            timing, table = step_timing(engine, prompts_of(1, 16, cfg.vocab_size, 2), params, profile)
        except Exception as e:  # keep the other variants
            log(f"[b1 {name}] failed: {type(e).__name__}: {str(e)[:1500]}")
            continue
        finally:
            compiled_decode.INDUCTOR_OPTIONS, compiled_decode.SPLIT_MLP_ACT = default_options, True
        tps = 1e3 / timing["wall_ms"]
        res[name] = dict(build_s=build, tok_s=tps, gpu_tok_s=1e3 / timing["gpu_ms"], **timing,
                         gb_s=tps * per_tok / 1e9)
        log(f"[b1 {name}] build {build:.1f}s; {tps:.1f} tok/s ({tps * per_tok / 1e9:.0f} GB/s, bound "
            f"{bw / per_tok:.0f}); step {timing['wall_ms']:.3f} ms, GPU {timing['gpu_ms']:.3f} ms "
            f"(GPU-only {1e3 / timing['gpu_ms']:.1f} tok/s), host gap {timing['host_gap_ms']:.3f} ms")
        if table:
            print(f"---- kernels of 16 batch-1 decode steps, {name} ----\n{table}", flush=True)
        save()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def bench_qwenlm(model, cfg, dev, bw, args, compile_decode: bool | None, tag: str, full: bool = True, **kw):
    """(1) batch 1, (2) 128 concurrent, host gap at full batch; with full=True also (3) TTFT and (5) the sweep.
    kw: more EngineConfig fields (kv_cache_dtype, overlap_steps)."""
    wbytes = streamed_weight_bytes(model)
    kvb = kv_bytes_per_token(cfg, model.lm_head.weight.dtype)
    if kw.get("kv_cache_dtype") == "int8":
        kvb = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.head_dim + 8)  # uint8 + fp32 scale, zero
    t = time.time()
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=args.max_batch, max_num_batched_tokens=8192,
                                                 gpu_memory_utilization=0.9, compile_decode=compile_decode,
                                                 num_blocks=args.num_blocks, **kw))
    build = time.time() - t
    log(f"[{tag}] engine ready in {build:.1f}s: {engine.blocks.num_blocks} blocks, "
        f"graphs for {sorted(engine.runner.graphs)}, compiled decode {engine.runner.compiled}")
    res = RESULTS.setdefault(tag, {})
    res["build_s"] = build
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

    # (1) batch-1 decode, 256 new tokens after a short prompt
    run_timed(engine, prompts_of(1, 16, cfg.vocab_size, 1), greedy(16))  # warm-up
    wall, dec_s, dec_tok, _ = run_timed(engine, prompts_of(1, 16, cfg.vocab_size, 2), greedy(args.new_tokens))
    tps = dec_tok / dec_s
    TOKENS[tag, "b1"] = run_timed.last_tokens
    per_tok = wbytes + (16 + args.new_tokens / 2) * kvb
    res["b1"] = dict(tok_s=tps, gb_s=tps * per_tok / 1e9, bound_tok_s=bw / per_tok, wall_s=wall)
    log(f"[{tag}] b1 decode {tps:.1f} tok/s, {tps * per_tok / 1e9:.0f} GB/s, bound {bw / per_tok:.1f} tok/s")
    save()

    # (3) time to first token, 2,048-token prompts (fresh prompts: no prefix-cache hits)
    ttfts = [] if full else [0.0]
    for s in range(4 if full else 0):
        _, _, _, first = run_timed(engine, prompts_of(1, args.ttft_len, cfg.vocab_size, 100 + s), greedy(1))
        ttfts.append(first)
    ttft = statistics.median(ttfts[1:] or ttfts)
    flops = 2 * (wbytes / 2) * args.ttft_len + 2 * args.ttft_len ** 2 * cfg.hidden_size * cfg.num_hidden_layers
    if full:
        res["ttft"] = dict(ms=ttft * 1e3, tflops=flops / ttft / 1e12, all_ms=[x * 1e3 for x in ttfts])
        log(f"[{tag}] TTFT {args.ttft_len} tokens: {ttft * 1e3:.1f} ms ({flops / ttft / 1e12:.0f} TFLOP/s)")
        save()

    # (2) 128 concurrent requests, 512 prompt / 256 output tokens
    n = args.max_batch
    wall, dec_s, dec_tok, _ = run_timed(engine, prompts_of(n, args.prompt_len, cfg.vocab_size, 3),
                                        greedy(args.new_tokens))
    out_tps = n * args.new_tokens / wall
    TOKENS[tag, "throughput"] = run_timed.last_tokens
    res["throughput"] = dict(requests=n, output_tok_s=out_tps, decode_tok_s=dec_tok / dec_s, wall_s=wall,
                             decode_s=dec_s, preemptions=engine.scheduler.num_preemptions)
    log(f"[{tag}] {n} requests x {args.prompt_len}/{args.new_tokens}: {out_tps:.0f} output tok/s "
        f"(decode steps alone {dec_tok / dec_s:.0f} tok/s), {wall:.2f}s of which decode steps {dec_s:.2f}s, "
        f"stats {engine.stats()}")
    save()
    if dev.type == "cuda":  # host gap of full-batch decode steps
        timing, table = step_timing(engine, prompts_of(n, 128, cfg.vocab_size, 4), greedy(32),
                                    profile=tag == "qwenlm int8 KV")
        if table:
            print(f"---- kernels of 16 batch-{n} decode steps, {tag} ----\n{table}", flush=True)
        res["b128_steps"] = timing
        log(f"[{tag}] batch {n} decode step {timing['wall_ms']:.2f} ms, GPU {timing['gpu_ms']:.2f} ms, "
            f"host gap {timing['host_gap_ms']:.2f} ms")

    # (5) decode tok/s at several batch sizes (prompt 128, 128 new tokens)
    sweep = []
    for b in args.sweep if full else []:
        if b > args.max_batch:
            continue
        _, dec_s, dec_tok, _ = run_timed(engine, prompts_of(b, 128, cfg.vocab_size, 1000 + b), greedy(128))
        tps = dec_tok / dec_s
        step_bytes = wbytes + b * (128 + 64) * kvb
        sweep.append(dict(batch=b, tok_s=tps, gb_s=tps / b * step_bytes / 1e9, bound_tok_s=b * bw / step_bytes))
        log(f"[{tag}] sweep batch {b}: {tps:.0f} tok/s, {tps / b * step_bytes / 1e9:.0f} GB/s, "
            f"bound {b * bw / step_bytes:.0f}")
    if full:
        res["sweep"] = sweep
    save()
    del engine
    gc.collect()
    torch.cuda.empty_cache() if dev.type == "cuda" else None


def bench_memory(model, cfg, dev, args):
    """(4) peak memory while encoding 2,048 tokens with the KV pool sized to that need."""
    if dev.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bs = 16
    engine = LLMEngine(model, None, EngineConfig(num_blocks=args.ttft_len // bs + 1, block_size=bs,
                                                 max_num_batched_tokens=args.ttft_len, max_num_seqs=1,
                                                 cuda_graph_batch_sizes=[1]))
    engine.generate([prompts_of(1, args.ttft_len, cfg.vocab_size, 7)[0]],
                    SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    peak = torch.cuda.max_memory_allocated()
    RESULTS["peak_memory_2048"] = dict(gb=peak / 1e9, gib=peak / 2**30)
    log(f"peak memory encoding {args.ttft_len} tokens: {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB)")
    save()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def bench_transformers(cfg: ModelConfig, dev, bw, args):
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError as e:
        log(f"transformers unavailable: {e}")
        return
    hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                         max_position_embeddings=cfg.seq_length, rope_theta=cfg.rotary_emb_base,
                         rms_norm_eps=cfg.layer_norm_epsilon, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    try:
        with torch.device(dev):
            hf = Qwen2ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    wbytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    res = RESULTS.setdefault("transformers", {})
    for batch, plen in ((1, 16), (args.hf_batch, args.prompt_len)):
        ids = torch.tensor(prompts_of(batch, plen, cfg.vocab_size, 5), device=dev)
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        sync(dev)
        t = time.perf_counter()
        new = args.new_tokens if batch > 1 else args.hf_b1_tokens
        out = hf.generate(ids, max_new_tokens=new, **kw)
        sync(dev)
        dt = time.perf_counter() - t
        made = (out.shape[1] - plen) * batch
        tps = made / dt
        res[f"b{batch}"] = dict(tok_s=tps, gb_s=tps / batch * wbytes / 1e9, tokens=made, prompt_len=plen)
        log(f"transformers batch {batch} (prompt {plen}, {new} new): {tps:.1f} tok/s, "
            f"{tps / batch * wbytes / 1e9:.0f} GB/s")
        save()
    del hf
    gc.collect()
    torch.cuda.empty_cache() if dev.type == "cuda" else None


def plot(bw):
    rows = []
    for tag in ("qwenlm", "qwenlm eager"):
        for r in RESULTS.get(tag, {}).get("sweep", []):
            rows.append((tag, r["batch"], r["tok_s"], r["bound_tok_s"], r["gb_s"]))
    with open(os.path.join(OUT, "engine_batch_sweep.csv"), "w") as f:
        f.write("engine,batch,tok_s,bound_tok_s,gb_s\n")
        f.writelines(f"{t},{b},{x:.1f},{y:.1f},{g:.0f}\n" for t, b, x, y, g in rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tag in ("qwenlm", "qwenlm eager"):
        pts = [(b, x) for t, b, x, _, _ in rows if t == tag]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{tag} decode")
    bound = sorted({(b, y) for _, b, _, y, _ in rows})
    if bound:
        ax.plot(*zip(*bound), "k--", label=f"bandwidth bound ({bw / 1e12:.2f} TB/s copy)")
    hf = RESULTS.get("transformers", {})
    for key, r in hf.items():
        ax.plot([int(key[1:])], [r["tok_s"]], "rs")
    if hf:
        ax.plot([], [], "rs", label="transformers generate")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sequences (prompt 128, 128 new tokens)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Qwen-7B shape, bf16, random weights")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "engine_batch_sweep.png"), dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the script)")
    ap.add_argument("--checks-only", action="store_true", help="only the tiny-model checks of the GPU path")
    ap.add_argument("--no-eager", action="store_true", help="skip the run without compiled decode")
    ap.add_argument("--no-variants", action="store_true", help="skip the batch-1 variants and profiles")
    ap.add_argument("--variants", default="eager graphs, w1/w2;eager graphs, gate_up;compiled, cuBLAS GEMV;"
                    "compiled, Triton, SiLU in c_proj;compiled, Triton GEMV, steps not overlapped;"
                    "compiled, Triton GEMV",
                    type=lambda v: v.split(";"), help="batch-1 variants to run, ';'-separated")
    ap.add_argument("--no-int8-kv", action="store_true", help="skip the defaults + int8 KV cache run")
    ap.add_argument("--no-sync", action="store_true", help="skip the run without overlapped steps")
    ap.add_argument("--attention-before", action="store_true",
                    help="also run with the v1 decode attention kernel for every batch")
    ap.add_argument("--eager-deadline", type=float, default=330, help="skip the eager run after this many s")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        cfg = ModelConfig(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          kv_channels=16, intermediate_size=256)
        args.new_tokens, args.prompt_len, args.ttft_len, args.max_batch, args.hf_batch = 8, 16, 64, 8, 2
        args.sweep, args.num_blocks, args.hf_b1_tokens = [1, 2, 8], 256, 8
        dtype = torch.float32
    else:
        cfg = ModelConfig()  # Qwen-7B's config.json values
        args.new_tokens, args.prompt_len, args.ttft_len, args.max_batch, args.hf_batch = 256, 512, 2048, 128, 32
        args.sweep, args.num_blocks, args.hf_b1_tokens = [1, 2, 4, 8, 16, 32, 64, 128], None, 64
        dtype = torch.bfloat16
    RESULTS["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    RESULTS["torch"] = torch.__version__
    bw = copy_bandwidth(dev)
    RESULTS["copy_bandwidth_gb_s"] = bw / 1e9
    log(f"{RESULTS['device']}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")

    check_overlap_gpu(dev)
    check_compiled_prefill_gpu(dev)
    if args.checks_only:
        return
    bench_attention_kernel(cfg, dev, bw)
    model = build_qwen(cfg, dev, dtype)
    wbytes = streamed_weight_bytes(model)
    RESULTS["weight_bytes_per_token"] = wbytes
    log(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{wbytes / 1e9:.2f} GB streamed per decode step")
    if not args.no_variants:
        bench_variants(model, cfg, dev, bw, args)
    bench_qwenlm(model, cfg, dev, bw, args, compile_decode=None, tag="qwenlm")  # the defaults
    if not args.no_int8_kv:
        bench_qwenlm(model, cfg, dev, bw, args, compile_decode=None, tag="qwenlm int8 KV", full=False,
                     kv_cache_dtype="int8")
    if args.attention_before:  # the same engine with the v1 attention kernel at every batch
        from qwenlm.kernels import attention_config as attention_kernels
        tables = attention_kernels.DECODE_CONFIGS
        v1 = attention_kernels.DecodeConfig("v1")
        attention_kernels.DECODE_CONFIGS = {"bf16": [(1, v1)], "int8": [(1, v1)]}
        try:
            bench_qwenlm(model, cfg, dev, bw, args, compile_decode=None, tag="qwenlm v1 attention", full=False)
            bench_qwenlm(model, cfg, dev, bw, args, compile_decode=None, tag="int8 KV v1 attention", full=False,
                         kv_cache_dtype="int8")
        finally:
            attention_kernels.DECODE_CONFIGS = tables
        for a, b in (("qwenlm", "qwenlm v1 attention"), ("qwenlm int8 KV", "int8 KV v1 attention")):
            for fig in ("b1", "throughput"):
                same = TOKENS.get((a, fig)) == TOKENS.get((b, fig))
                RESULTS[f"same_tokens {a} / {b} {fig}"] = same
                log(f"{fig}: {a} and {b} give the same greedy tokens: {same}")
    if not args.no_sync:
        bench_qwenlm(model, cfg, dev, bw, args, compile_decode=None, tag="qwenlm no overlap", full=False,
                     overlap_steps=False)
        for fig in ("b1", "throughput"):
            a, b = TOKENS.get(("qwenlm", fig)), TOKENS.get(("qwenlm no overlap", fig))
            RESULTS[f"overlap_same_tokens_{fig}"] = a == b
            log(f"{fig}: overlapped and synchronous steps give the same tokens: {a == b}")
    bench_memory(model, cfg, dev, args)
    model.cpu() if dev.type == "cuda" else None  # make room for the transformers model
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    bench_transformers(cfg, dev, bw, args)
    plot(bw)
    model.to(dev)
    if not args.no_eager and time.time() - T0 < args.eager_deadline:
        try:
            bench_qwenlm(model, cfg, dev, bw, args, compile_decode=False, tag="qwenlm eager")
        except Exception as e:  # report, keep the other figures
            log(f"eager decode failed: {type(e).__name__}: {str(e)[:2000]}")
        plot(bw)
    save()

    print("\n==== qwenlm engine vs transformers vs bound (" + RESULTS["device"] + ") ====")
    hf = RESULTS.get("transformers", {})
    for tag in ("qwenlm", "qwenlm int8 KV", "qwenlm v1 attention", "int8 KV v1 attention", "qwenlm no overlap",
                "qwenlm eager"):
        r = RESULTS.get(tag)
        if not r or "b1" not in r:
            continue
        b1 = r["b1"]
        print(f"{tag:22s} b1 decode      {b1['tok_s']:8.1f} tok/s  {b1['gb_s']:6.0f} GB/s  "
              f"bound {b1['bound_tok_s']:.1f}  transformers {hf.get('b1', {}).get('tok_s', float('nan')):.1f}")
        if "throughput" in r:
            t = r["throughput"]
            hf_b = hf.get(f"b{args.hf_batch}", {}).get("tok_s", float("nan"))
            print(f"{tag:22s} {t['requests']} x {args.prompt_len}/{args.new_tokens}  {t['output_tok_s']:8.0f} "
                  f"output tok/s (decode steps {t['decode_tok_s']:.0f})  transformers batch {args.hf_batch}: {hf_b:.0f}")
        if "b128_steps" in r:
            st = r["b128_steps"]
            print(f"{tag:22s} batch {args.max_batch} step  {st['wall_ms']:8.2f} ms  GPU {st['gpu_ms']:.2f} ms  "
                  f"host gap {st['host_gap_ms']:.2f} ms")
        if "ttft" in r:
            print(f"{tag:22s} TTFT {args.ttft_len}      {r['ttft']['ms']:8.1f} ms  ({r['ttft']['tflops']:.0f} TFLOP/s)")
    for name, v in RESULTS.get("b1_variants", {}).items():
        print(f"b1 {name:44s} {v['tok_s']:7.1f} tok/s ({v['gb_s'] * 1e9 / 1e9:5.0f} GB/s)  GPU alone "
              f"{v['gpu_tok_s']:7.1f}  host gap {v['host_gap_ms']:.3f} ms  build {v['build_s']:.0f} s")
    if "peak_memory_2048" in RESULTS:
        m = RESULTS["peak_memory_2048"]
        print(f"peak memory encoding {args.ttft_len} tokens: {m['gb']:.2f} GB ({m['gib']:.2f} GiB)")
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
