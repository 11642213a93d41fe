"""Text streaming (stop strings across tokens), the AsyncEngine, and the Triton decode kernel."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from engine_helpers import random_prompts, reference_ids, tiny_engine, tiny_model
from qwenlm.engine import AsyncEngine, SamplingParams
from qwenlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def full_vocab():
    return tiny_model(vocab_size=151936), Tokenizer.from_file()


def test_stop_string_spanning_two_tokens_is_cut(full_vocab):
    model, tok = full_vocab
    prompt = tok.encode("The quick brown fox jumps over")
    free = reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    pieces = [tok.decode([t]) for t in free]
    # a stop made of the end of one token's text and the start of the next's
    i = next(i for i in range(2, len(pieces) - 1)
             if pieces[i].strip() and pieces[i + 1].strip() and "\ufffd" not in pieces[i] + pieces[i + 1]
             and (pieces[i][-1] + pieces[i + 1][0]) not in "".join(pieces[:i]))
    stop = pieces[i][-1] + pieces[i + 1][0]
    engine = tiny_engine(model, tok)
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0].text_delta)
            final = out
    text = tok.decode(free)
    want = text[:text.index(stop)]
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == want == "".join(deltas)
    assert final.outputs[0].token_ids == free[:i + 2]


def test_async_engine_streams_concurrent_requests(model):
    prompts = random_prompts([9, 25, 4, 14], seed=31)
    p = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    engine = AsyncEngine(tiny_engine(model, max_num_batched_tokens=16))

    async def consume(i):
        steps = []
        async for out in engine.generate(prompts[i], p, request_id=f"r{i}"):
            steps.append(out)
        return steps

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(len(prompts))))

    try:
        results = asyncio.run(main())
        for prompt, steps in zip(prompts, results):
            # one output per new token, or fewer when the consumer fell behind (queued steps come merged)
            assert steps[-1].finished and 1 <= len(steps) <= 7
            ids = [s.outputs[0].token_ids for s in steps]
            assert all(len(a) < len(b) and b[:len(a)] == a for a, b in zip(ids, ids[1:]))
            assert steps[-1].outputs[0].token_ids == reference_ids(model, prompt, p)
        stats = engine.stats()
        assert stats["num_running"] == stats["num_waiting"] == 0
        assert stats["generation_tokens_total"] == 28 and stats["prompt_tokens_total"] == 52
    finally:
        engine.shutdown()


def test_async_consumer_leaving_aborts_and_frees_blocks(model):
    engine = AsyncEngine(tiny_engine(model))
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        gen = engine.generate(random_prompts([12])[0], long, request_id="gone")
        async for out in gen:
            if len(out.outputs[0].token_ids) == 3:
                break
        await gen.aclose()
        stream = engine.generate(random_prompts([8])[0], long, request_id="aborted")
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 2:
                await engine.abort("aborted")
        deadline = time.monotonic() + 60  # the engine thread may be slow to get the CPU on a loaded machine
        while engine.engine.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return seen

    try:
        seen = asyncio.run(main())
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
        assert not engine.engine.has_unfinished()
        blocks = engine.engine.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
    finally:
        engine.shutdown()


def test_triton_paged_decode_kernels_match_reference_in_interpreter():
    """Every kernel (v1; v2 and mma with context splits, combined by a second launch or in the kernel, with all
    splits or as many as the context needs), with and without the fused store of the new token's K/V, against
    store-then-reference: outputs and the pools."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from qwenlm.kernels.attention import DecodeConfig, paged_decode_attention, paged_decode_attention_ref
        g = torch.Generator().manual_seed(0)
        B, H, D, bs, nb = 4, 4, 16, 4, 48
        configs = [DecodeConfig("v1", block_n=8), DecodeConfig(block_n=8), DecodeConfig(splits=3, block_n=4),
                   DecodeConfig(splits=8, block_n=2), DecodeConfig("mma", block_n=16),
                   DecodeConfig("mma", splits=3, block_n=16),
                   # splits used as the context needs (with the in-kernel combination): 1, 2 or 3 of 8 / of 3
                   DecodeConfig(splits=8, block_n=4, min_chunk=16),
                   DecodeConfig("mma", splits=3, block_n=16, min_chunk=32)]
        variants = [(cfg, fused, counted) for cfg in configs for fused in (False, True)
                    for counted in ((False, True) if cfg.splits > 1 else (False,)) if counted or not cfg.min_chunk]
        for cfg, fused, counted in variants:
            # the tensor-core kernel takes fp16 / bf16 pools: fp16 here, its output rounded to fp16 (~5e-4)
            dt, tol = (torch.float16, 2e-3) if cfg.kernel == "mma" else (torch.float32, 1e-5)
            counters = torch.zeros(B * H, dtype=torch.int32) if counted else None
            kc, vc = torch.randn(nb, bs, H, D, generator=g).to(dt), torch.randn(nb, bs, H, D, generator=g).to(dt)
            tables = torch.randperm(nb - 1, generator=g)[:40].view(B, 10).int()
            lens = torch.tensor([1, 7, 40, 0]).int()
            q = torch.randn(B, H, D, generator=g).to(dt)
            kn = torch.randn(B, H, D, generator=g).to(dt)
            vn = torch.randn(B, 3, H, D, generator=g).to(dt)[:, 1]  # strided, a slice of the fused projection
            pos = (lens - 1).clamp(min=0).long()
            slots = tables.long()[torch.arange(B), pos // bs] * bs + pos % bs
            slots[3] = (nb - 1) * bs  # a padding row stores into the scratch block and attends to nothing
            ref_k, ref_v = kc.clone(), vc.clone()
            if fused:
                ref_k.view(-1, H, D)[slots], ref_v.view(-1, H, D)[slots] = kn, vn
            out = torch.full_like(q, float("nan"))
            new = dict(k_new=kn, v_new=vn, slots=slots) if fused else {}
            # an L2 prefetch of another tensor changes nothing (on sm_90+ only; here it is skipped)
            pf = dict(prefetch=(torch.zeros(1 << 16, dtype=torch.int32), 1 << 18)) if cfg.kernel == "mma" else {}
            paged_decode_attention(q, kc, vc, tables, lens, out=out, config=cfg, counters=counters, **new, **pf)
            ref = paged_decode_attention_ref(q[:3].float(), ref_k.float(), ref_v.float(), tables[:3], lens[:3])
            err = ((out[:3].float() - ref).norm() / ref.norm()).item()
            assert err < tol, (cfg, fused, counted, err)
            assert not counted or not counters.any(), (cfg, fused)  # left at zero for the next call
            assert torch.equal(out[3], torch.zeros_like(out[3])), (cfg, fused)  # zeros, not NaN
            assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v), (cfg, fused)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_decode_config_table_covers_every_batch():
    from qwenlm.kernels.attention_config import DECODE_CONFIGS, DecodeConfig, decode_config
    for int8 in (False, True):
        for batch in range(1, 257):
            cfg = decode_config(batch, int8)
            assert isinstance(cfg, DecodeConfig) and cfg.kernel in ("v1", "v2", "mma")
            assert cfg.splits >= 1 and cfg.block_n & (cfg.block_n - 1) == 0
    assert decode_config(1, False) == DECODE_CONFIGS["bf16"][0][1]
    assert decode_config(256, True) == DECODE_CONFIGS["int8"][-1][1]
    assert decode_config(3, False) == decode_config(2, False)  # the entry of the largest start <= 3
    for batch in (1, 8, 128):  # fp32 pools: v2 where the table says mma (tensor cores take 16-bit operands)
        cfg, fp32 = decode_config(batch, False), decode_config(batch, False, torch.float32)
        assert fp32.kernel == ("v2" if cfg.kernel == "mma" else cfg.kernel) and fp32.splits == cfg.splits
    # splits handed out uncombined (the fused Int4 step): their own batch-1 config on 16-bit pools only
    from qwenlm.kernels.attention_config import PARTIALS_BATCH1
    assert decode_config(1, False, torch.float16, partials=True) == PARTIALS_BATCH1
    assert PARTIALS_BATCH1.kernel == "mma" and PARTIALS_BATCH1.splits > 1
    assert decode_config(2, False, partials=True) == decode_config(2, False)
    assert decode_config(1, True, partials=True) == decode_config(1, True)


def test_torch_paged_reference_matches_dense_attention():
    g = torch.Generator().manual_seed(1)
    from qwenlm.kernels.attention import paged_decode_attention_ref
    H, D, bs = 2, 8, 4
    k = torch.randn(11, H, D, generator=g)
    v = torch.randn(11, H, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    kc, vc = torch.zeros(5, bs, H, D), torch.zeros(5, bs, H, D)
    table = [3, 0, 4]
    for p in range(11):
        kc[table[p // bs], p % bs], vc[table[p // bs], p % bs] = k[p], v[p]
    got = paged_decode_attention_ref(q, kc, vc, torch.tensor([table]).int(), torch.tensor([11]).int())
    w = torch.softmax((q[0][:, None, :] * k.transpose(0, 1)).sum(-1) / D ** 0.5, -1)  # [H,11]
    want = torch.einsum("hs,shd->hd", w, v)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_a_consumer_that_fell_behind_gets_queued_steps_merged():
    from qwenlm.engine.async_engine import queued_outputs
    from qwenlm.engine.outputs import CompletionOutput, RequestError, RequestOutput

    def out(ids, deltas, finished=False):
        outs = [CompletionOutput(i, ids[:k + 1], "".join(deltas[:k + 1]), deltas[k]) for i, k in ((0, len(ids) - 1),)]
        return RequestOutput("r", [1], outs, finished)

    async def read(items):
        q = asyncio.Queue()
        for item in items:
            q.put_nowait(item)
        got, left = [], []
        try:
            async for o in queued_outputs(q, lambda: left.append(True)):
                got.append(o)
        except RequestError as e:
            got.append(e)
        return got, left

    # three steps queued, then the error that ended the request: one merged output first, then the error
    got, left = asyncio.run(read([out([5], ["a"]), out([5, 6], ["a", "bc"]), out([5, 6, 7], ["a", "bc", "d"]),
                                  RequestError("boom")]))
    assert [o.outputs[0].text_delta for o in got[:1]] == ["abcd"] and got[0].outputs[0].token_ids == [5, 6, 7]
    assert isinstance(got[1], RequestError) and str(got[1]) == "boom" and not left
    # a finished output ends the stream: nothing after it is merged in
    got, left = asyncio.run(read([out([5], ["a"]), out([5, 6], ["a", "b"], finished=True)]))
    assert len(got) == 1 and got[0].finished and got[0].outputs[0].text_delta == "ab" and not left
