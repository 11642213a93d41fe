"""Int8 KV cache in the paged engine (EngineConfig(kv_cache_dtype="int8")): accuracy against the model-dtype
cache, pool accounting, chunked/prefix-cached prefill consistency, and the kernels against their references."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine_helpers import random_prompts, tiny_engine, tiny_model
from qwenlm.engine import EngineConfig, SamplingParams
from qwenlm.engine.attention import PagedAttention, PrefillSeq
from qwenlm.kernels.attention import paged_decode_attention_ref
from qwenlm.kernels.kv_int8 import quantize_store_kv_ref
from qwenlm.model import quant


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def teacher_forced_logits(model, ids, kv_cache_dtype, prompt_len, block_size=4):
    """Logits of every position: one prefill of prompt_len tokens, then one decode step per token, on a paged
    pool whose blocks are shuffled."""
    cfg, T = model.config, ids.shape[1]
    nb = -(-T // block_size) + 1
    ctx = PagedAttention.allocate((cfg.num_hidden_layers, nb, block_size, cfg.num_attention_heads, cfg.head_dim),
                                  torch.float32, kv_cache_dtype, "cpu")
    table = torch.randperm(nb - 1, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)
    slots = table[pos // block_size] * block_size + pos % block_size
    inv = model.inv_freq([1.0], "cpu")
    with torch.inference_mode():
        ctx.set_prefill(slots[:prompt_len], [PrefillSeq(0, prompt_len, prompt_len, None)])
        out = [model.logits(model(ids[:, :prompt_len], pos[None, :prompt_len], ctx, inv, use_logn=False)[0])]
        for t in range(prompt_len, T):
            ctx.set_decode(slots[t:t + 1], table[None].int(), torch.tensor([t + 1]).int(), t + 1)
            out.append(model.logits(model(ids[:, t:t + 1], pos[None, t:t + 1], ctx, inv, use_logn=False)[:, 0]))
    return torch.cat(out)


def test_int8_kv_logits_close_to_model_dtype_cache(model):
    # Stated bound: teacher-forced logits (prefill + 16 decode steps) within 0.01 absolute of the fp32 cache's,
    # with logits of magnitude ~0.7 (std 0.16) on this model; measured 0.0044-0.0048 on 3 sequences.
    # Dropping the zero point or using one scale per tensor gives errors of order 1.
    for seed in range(3):
        ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(seed))
        ref = teacher_forced_logits(model, ids, "auto", 24)
        got = teacher_forced_logits(model, ids, "int8", 24)
        err = (got - ref).abs().max().item()
        assert 0 < err < 0.01, (seed, err)


def test_int8_kv_engine_greedy_ids_equal_model_dtype_cache(model):
    # Stated: identical greedy ids for 12 new tokens on these 6 prompts (measured), logprobs within 0.005
    # (measured <= 0.0033). The int8 cache moves logits by ~3e-3, so it flips greedy near-ties (it does on 23 of
    # the first 40 prompt seeds): these prompts' decisions have top-2 logit gaps >= 1.3e-3 in both runs, ~10x what
    # another CPU or thread count can change in the int8 run (truncations flipped by one step: <= 1.4e-4 between
    # whole and chunked prefill, test below).
    prompts = random_prompts([3, 17, 42, 1, 9, 30], seed=33)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    ref = tiny_engine(model).generate(prompts, p)
    engine = tiny_engine(model, kv_cache_dtype="int8")
    got = engine.generate(prompts, p)
    assert engine.runner.k_cache.dtype == torch.uint8
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        err = (torch.tensor(a.outputs[0].logprobs) - torch.tensor(b.outputs[0].logprobs)).abs().max().item()
        assert err < 5e-3, err
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_int8_kv_chunked_and_prefix_cached_prefill_see_the_stored_rows(model):
    """Prefill always attends to the dequantized stored K/V, so chunking and prefix-cache hits change nothing
    beyond float summation order. Checked exactly: every prefill chunk's own K/V, as attended, are the rows read
    back from the pool. End to end: the same greedy ids, logprobs within 1e-3 (the summation order flips rare
    truncations by one step: measured up to 1.4e-4 with 2 threads, 3.5e-5 with 1; int8 vs fp32 caches: ~3e-3)."""
    prompts = random_prompts([37, 23], seed=3)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)

    def int8_engine(**kw):
        engine = tiny_engine(model, kv_cache_dtype="int8", **kw)
        ctx, prefill = engine.runner.ctx, engine.runner.ctx._prefill

        def spy(q, k, v, gather):
            if ctx.slot_mapping is not None:
                stored_k, stored_v = gather(ctx.slot_mapping)
                assert torch.equal(k.reshape(stored_k.shape), stored_k)
                assert torch.equal(v.reshape(stored_v.shape), stored_v)
                spied.append(len(ctx.slot_mapping))
            return prefill(q, k, v, gather)

        ctx._prefill = spy
        return engine

    spied = []
    whole = int8_engine(max_num_batched_tokens=512, enable_prefix_caching=False).generate(prompts, p)
    chunked = int8_engine(max_num_batched_tokens=5, enable_prefix_caching=False).generate(prompts, p)
    cached_engine = int8_engine()
    cached_engine.generate([prompts[0][:30]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    cached = cached_engine.generate(prompts, p)
    assert cached_engine.blocks.prefix_hits >= 28  # 7 full blocks of 4 reused
    assert 5 in spied and 37 + 23 in spied  # chunks of 5 and the two whole prompts went through the check
    for a, b, c in zip(whole, chunked, cached):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        for other in (b, c):
            torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(other.outputs[0].logprobs),
                                       rtol=0, atol=1e-3)


def test_int8_pool_holds_1_88x_tokens_for_the_same_bytes(model):
    cfg = model.config
    eng = {kv: tiny_engine(model, kv_cache_dtype=kv, num_blocks=10) for kv in ("auto", "int8")}
    bytes_per_block = {}
    for kv, e in eng.items():
        r = e.runner
        pools = [r.ctx.k_cache, r.ctx.v_cache] + ([r.ctx.k_sz, r.ctx.v_sz] if kv == "int8" else [])
        allocated = sum(t.numel() * t.element_size() for t in pools)
        assert allocated == r.block_bytes() * (r.num_blocks + 1)  # sizing and allocation agree (+1 scratch block)
        bytes_per_block[kv] = r.block_bytes()
    tokens_heads = cfg.num_hidden_layers * 4 * cfg.num_attention_heads  # block_size 4
    assert bytes_per_block["auto"] == tokens_heads * 2 * cfg.head_dim * 4  # fp32 model: K and V of 4 bytes
    assert bytes_per_block["int8"] == tokens_heads * 2 * (cfg.head_dim + 8)  # uint8 rows + fp32 scale, zero
    # A bf16 model with head_dim 128 (Qwen-7B): 2*128*2 = 512 vs 2*(128+8) = 272 bytes per token and head.
    budget = 1 << 30
    ratio = (budget // (2 * (128 + 8))) / (budget // (2 * 128 * 2))
    assert 1.88 < ratio < 1.89
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


def test_torch_int8_paged_decode_equals_attention_over_dequantized_rows():
    g = torch.Generator().manual_seed(1)
    H, D, bs, S = 2, 8, 4, 11
    k, v = torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    kc, vc = torch.zeros(5, bs, H, D, dtype=torch.uint8), torch.zeros(5, bs, H, D, dtype=torch.uint8)
    ks, vs = torch.zeros(5, bs, H, 2), torch.zeros(5, bs, H, 2)
    table = torch.tensor([3, 0, 4])
    slots = table[torch.arange(S) // bs] * bs + torch.arange(S) % bs
    quantize_store_kv_ref(k, v, kc, vc, ks, vs, slots)
    kd, vd = (quant.dequantize_kv(*quant.quantize_kv(x), torch.float32) for x in (k, v))  # the official math
    assert torch.equal(kc.view(-1, H, D)[slots], quant.quantize_kv(k)[0])
    got = paged_decode_attention_ref(q, kc, vc, table[None].int(), torch.tensor([S]).int(), k_sz=ks, v_sz=vs)
    w = torch.softmax((q[0][:, None, :] * kd.transpose(0, 1)).sum(-1) / D ** 0.5, -1)  # [H,S]
    want = torch.einsum("hs,shd->hd", w, vd)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_triton_int8_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from qwenlm.kernels.attention import DecodeConfig, paged_decode_attention, paged_decode_attention_ref
        from qwenlm.kernels.kv_int8 import dequantize_rows, quantize_store_kv, quantize_store_kv_ref
        g = torch.Generator().manual_seed(0)
        B, H, D, bs, nb = 4, 3, 16, 4, 48
        n = 40
        # K/V as the model hands them: v a strided slice of a fused projection, k contiguous
        k = torch.randn(n, H, D, generator=g) * 3
        v = torch.randn(n, 3, H, D, generator=g)[:, 1]
        slots = torch.randperm(nb * bs, generator=g)[:n]
        pools = [torch.zeros(nb, bs, H, D, dtype=torch.uint8) for _ in range(2)] + [torch.zeros(nb, bs, H, 2)
                                                                                   for _ in range(2)]
        ref_pools = [t.clone() for t in pools]
        quantize_store_kv(k, v, *pools, slots, use_triton=True)
        quantize_store_kv_ref(k, v, *ref_pools, slots)
        for a, b in zip(pools, ref_pools):
            if a.dtype == torch.uint8:
                assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3, (a != b).sum()
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        # the store's dequantized copy of the new rows is exactly what reading them back from the pool gives
        # (fp16 here: the interpreter's fp32 -> bf16 cast does not round to nearest as the GPU's does;
        # bench/check_gpu.py checks bf16 on the GPU)
        again = [torch.zeros_like(t) for t in pools]
        kd, vd = quantize_store_kv(k.half(), v.half(), *again, slots, use_triton=True, dequantized=True)
        for rows, cache, sz in ((kd, again[0], again[2]), (vd, again[1], again[3])):
            back = dequantize_rows(cache.view(-1, H, D)[slots], sz.view(-1, H, 2)[slots], torch.float16)
            assert rows.dtype == torch.float16 and torch.equal(rows, back)
        kc, vc, ks, vs = ref_pools
        kc.random_(0, 256, generator=g); vc.random_(0, 256, generator=g)  # every slot holds data
        ks.uniform_(0.001, 0.03, generator=g); vs.uniform_(0.001, 0.03, generator=g)
        ks[..., 1].uniform_(100, 150, generator=g); vs[..., 1].uniform_(100, 150, generator=g)
        tables = torch.randperm(nb, generator=g)[:40].view(B, 10).int()
        lens = torch.tensor([1, 7, 40, 0]).int()
        q = torch.randn(B, H, D, generator=g)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, lens, out=out, block_n=8, k_sz=ks, v_sz=vs)
        ref = paged_decode_attention_ref(q[:3], kc, vc, tables[:3], lens[:3], k_sz=ks, v_sz=vs)
        err = ((out[:3] - ref).norm() / ref.norm()).item()
        assert err < 1e-5, err
        assert torch.equal(out[3], torch.zeros_like(out[3]))
        # every kernel variant with the new token's K/V quantized and stored by the call, against
        # quantize_store_kv_ref then the reference; the pools must be bit-identical to the reference store
        H = 4
        kc, vc = (torch.randint(0, 256, (nb, bs, H, D), generator=g, dtype=torch.uint8) for _ in range(2))
        ks, vs = torch.rand(nb, bs, H, 2, generator=g), torch.rand(nb, bs, H, 2, generator=g)
        for t in (ks, vs):
            t[..., 0] = t[..., 0] * 0.03 + 1e-3
            t[..., 1] = t[..., 1] * 50 + 100
        q = torch.randn(B, H, D, generator=g)
        kn = torch.randn(B, H, D, generator=g) * 2
        vn = torch.randn(B, 3, H, D, generator=g)[:, 1]
        pos = (lens - 1).clamp(min=0).long()
        slots = tables.long()[torch.arange(B), pos // bs] * bs + pos % bs
        for cfg in (DecodeConfig("v1", block_n=8), DecodeConfig(block_n=8), DecodeConfig(splits=3, block_n=4),
                    DecodeConfig(splits=8, block_n=2), DecodeConfig("mma", block_n=16),
                    DecodeConfig("mma", splits=3, block_n=16)):
            pools = [kc.clone(), vc.clone(), ks.clone(), vs.clone()]
            want_pools = [kc.clone(), vc.clone(), ks.clone(), vs.clone()]
            quantize_store_kv_ref(kn, vn, *want_pools, slots)
            out = torch.full_like(q, float("nan"))
            paged_decode_attention(q, pools[0], pools[1], tables, lens, out=out, k_sz=pools[2], v_sz=pools[3],
                                   k_new=kn, v_new=vn, slots=slots, config=cfg)
            ref = paged_decode_attention_ref(q[:3], *want_pools[:2], tables[:3], lens[:3], k_sz=want_pools[2],
                                             v_sz=want_pools[3])
            err = ((out[:3] - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (cfg, err)
            assert torch.equal(out[3], torch.zeros_like(out[3])), cfg
            for a, b in zip(pools, want_pools):
                assert torch.equal(a, b), cfg
        # the splits handed out uncombined (SplitPartials), combined here as a consumer would
        pools = [kc.clone(), vc.clone(), ks.clone(), vs.clone()]
        parts = paged_decode_attention(q, pools[0], pools[1], tables, lens, k_sz=pools[2], v_sz=pools[3], k_new=kn,
                                       v_new=vn, slots=slots, config=DecodeConfig("mma", splits=3, block_n=16),
                                       partials=True)
        m, l_sum = parts.ml.view(2, B, H, 3)
        mx = m.max(-1, keepdim=True).values
        w = torch.exp(m - torch.where(mx == float("-inf"), 0.0, mx))
        total = (l_sum * w).sum(-1)
        out = (parts.acc.view(B, H, 3, D) * w[..., None]).sum(2) / torch.where(total > 0, total, 1.0)[..., None]
        err = ((out[:3] - ref).norm() / ref.norm()).item()
        assert parts.splits == 3 and err < 1e-5 and torch.equal(out[3], torch.zeros_like(out[3])), err
        print("ok", err)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_engine_decode_through_fused_triton_kernel_matches_torch_backend_in_interpreter():
    """PagedAttention's decode on the Triton backend (the kernel stores the new K/V itself, v1 or v2 by batch)
    against the torch backend (store, then the reference): teacher-forced logits and the pools, both pool dtypes."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import torch
        from engine_helpers import tiny_model
        from qwenlm.engine.attention import PagedAttention, PrefillSeq
        model = tiny_model()
        cfg = model.config
        bs, nb, T, P = 4, 12, 12, 6
        ids = torch.randint(0, 1000, (2, T), generator=torch.Generator().manual_seed(0))
        inv = model.inv_freq([1.0], "cpu")
        for kv in ("auto", "int8"):
            got = {}
            for backend in ("torch", "triton"):
                ctx = PagedAttention.allocate((cfg.num_hidden_layers, nb, bs, cfg.num_attention_heads, cfg.head_dim),
                                              torch.float32, kv, "cpu", backend)
                tables = torch.randperm(nb - 1, generator=torch.Generator().manual_seed(1))[:10].view(2, 5)
                pos = torch.arange(T)
                slots = tables[:, pos // bs] * bs + pos % bs  # [2,T]
                logits = []
                with torch.inference_mode():
                    flat = torch.cat([slots[0, :P], slots[1, :P]])
                    ctx.set_prefill(flat, [PrefillSeq(0, P, P, None), PrefillSeq(P, P, P, None)])
                    model(ids[:, :P].reshape(1, -1), pos[:P].repeat(2)[None], ctx, inv, use_logn=False)
                    for t in range(P, T):
                        ctx.set_decode(slots[:, t], tables.int(), torch.tensor([t + 1, t + 1]).int(), t + 1)
                        h = model(ids[:, t:t + 1], pos[None, t:t + 1].expand(2, 1), ctx, inv, use_logn=False)
                        logits.append(model.logits(h[:, 0]))
                pools = [ctx.k_cache, ctx.v_cache] + ([ctx.k_sz, ctx.v_sz] if kv == "int8" else [])
                got[backend] = torch.stack(logits), [p.clone() for p in pools]
            (a, pa), (b, pb) = got["torch"], got["triton"]
            err = (a - b).abs().max().item()
            # int8: the kernel's q.(scale*(k - zero)) = scale*(q.k - zero*sum(q)) sums in another order than the
            # reference over dequantized rows (measured 1.7e-4 at 13 steps); a wrong scale/zero gives > 3e-3
            assert err < (1e-4 if kv == "auto" else 1e-3), (kv, err)
            for x, y in zip(pa, pb):
                if x.dtype == torch.uint8:
                    # K/V of layer 2 come from attention outputs that differ in the last float bits, which moves
                    # a rare truncation by one step (measured 0.1-0.2% of bytes)
                    assert (x.int() - y.int()).abs().max() <= 1 and (x != y).float().mean() < 0.01, kv
                else:
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
            print(kv, err)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
