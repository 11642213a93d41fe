"""The paged engine against the single-request reference loop (qwenlm/generation.py, DenseKVCache)."""

import pytest
import torch

from engine_helpers import random_prompts, reference_ids, tiny_engine, tiny_model
from qwenlm.engine import EngineConfig, LLMEngine, SamplingParams
from qwenlm.sampling import ParamError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_mixed_length_concurrent_requests_equal_single_runs(model):
    prompts = random_prompts([3, 17, 42, 1, 9, 30])
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (10, 4, 12, 7, 1, 9)]
    engine = tiny_engine(model, max_num_batched_tokens=24)  # forces chunks and split prefill steps
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == reference_ids(model, prompt, p)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_equal_length_prompts_batched_in_one_attention_call_equal_single_runs(model):
    """Runs of fresh chunks of one length share one causal SDPA call ([G,h,L,d] views of the flat row)."""
    prompts = random_prompts([7, 7, 7, 5, 5, 9, 7], seed=11)
    engine = tiny_engine(model, max_num_batched_tokens=64, enable_prefix_caching=False)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    import qwenlm.engine.attention as attention
    attention.F = type("F", (), {"scaled_dot_product_attention": staticmethod(
        lambda q, *a, **k: calls.append(q.shape[0]) or sdpa(q, *a, **k))})
    try:
        outs = engine.generate(prompts, GREEDY)
    finally:
        attention.F = torch.nn.functional
    assert calls[:8] == [3, 2, 1, 1] * 2  # the first prefill step's groups, in each layer
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_ids(model, prompt, GREEDY)


def test_chunked_prefill_equals_unchunked(model):
    prompts = random_prompts([37, 23], seed=3)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)
    whole = tiny_engine(model, max_num_batched_tokens=512, enable_prefix_caching=False).generate(prompts, p)
    chunked = tiny_engine(model, max_num_batched_tokens=5, enable_prefix_caching=False).generate(prompts, p)
    for a, b in zip(whole, chunked):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   rtol=0, atol=1e-5)


def test_preemption_recomputes_and_leaks_no_blocks(model):
    prompts = random_prompts([14, 11, 16, 9], seed=5)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = tiny_engine(model, num_blocks=16)  # 64 slots for ~100 tokens of demand
    outs = engine.generate(prompts, p)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_ids(model, prompt, p)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_abort_frees_blocks_at_once(model):
    engine = tiny_engine(model, max_num_seqs=2)
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    a, b, c = (engine.add_request(None, pr, long) for pr in random_prompts([20, 13, 8], seed=7))
    for _ in range(4):
        engine.step()
    stats = engine.stats()
    assert stats["num_running"] == 2 and stats["num_waiting"] == 1 and stats["kv_usage"] > 0
    held = sum(len(s.block_table) for s in engine.requests[a].seqs)
    free_before = engine.blocks.num_free_blocks
    out = engine.abort(a)
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids
    assert engine.blocks.num_free_blocks == free_before + held
    assert engine.abort(c).outputs[0].token_ids == []  # still waiting: nothing to free, just dropped
    assert engine.abort("no-such-request") is None
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.stats()["num_running"] == engine.stats()["num_waiting"] == 0


def test_prefix_cache_hit_gives_cold_logits(model):
    shared = random_prompts([24], seed=11)[0]
    first, second = shared + [5, 6, 7], shared + [8, 9]
    captured = []
    orig = model.logits
    model.logits = lambda h: captured.append(orig(h)) or captured[-1]
    try:
        warm = tiny_engine(model)
        warm.generate([first], GREEDY)
        captured.clear()
        hot_out = warm.generate([second], GREEDY)[0]
        hot_first_logits = captured[0]
        captured.clear()
        cold_out = tiny_engine(model, enable_prefix_caching=False).generate([second], GREEDY)[0]
        cold_first_logits = captured[0]
    finally:
        del model.logits
    assert hot_out.num_cached_tokens == 24 and cold_out.num_cached_tokens == 0
    assert warm.stats()["prefix_cache_hit_rate"] > 0
    torch.testing.assert_close(hot_first_logits, cold_first_logits, rtol=0, atol=1e-5)
    assert hot_out.outputs[0].token_ids == cold_out.outputs[0].token_ids == reference_ids(model, second, GREEDY)


def test_prefix_cache_survives_finished_requests_and_full_prompt_hits(model):
    prompt = random_prompts([16], seed=12)[0]  # exactly 4 blocks: the last must still be computed
    engine = tiny_engine(model)
    a = engine.generate([prompt], GREEDY)[0]
    b = engine.generate([prompt], GREEDY)[0]
    assert b.num_cached_tokens == 12
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == reference_ids(model, prompt, GREEDY)


def test_ntk_and_logn_past_seq_length_equal_reference():
    # seq_length 16: a 40-token prompt gets NTK alpha 7 and LogN scaling; a 20-token prompt sharing its
    # first 20 tokens gets alpha 3, so its blocks must not be served from the alpha-7 cache.
    model = tiny_model(seq_length=16)
    long_prompt = random_prompts([40], seed=13)[0]
    prompts = [long_prompt, long_prompt[:20], long_prompt[:20] + [1, 2]]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = tiny_engine(model, max_num_batched_tokens=12)
    outs = engine.generate(prompts, p)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_ids(model, prompt, p)
    assert outs[2].num_cached_tokens == 20  # same alpha (3) as prompt 2: its blocks are reused
    assert outs[1].num_cached_tokens == 0


def test_stop_token_ids_and_max_model_len(model):
    prompt = random_prompts([6], seed=17)[0]
    free = reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    stop_id = free[3]
    engine = tiny_engine(model)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == free[:free.index(stop_id)]
    assert out.outputs[0].finish_reason == "stop"
    short = tiny_engine(model, max_model_len=10).generate([prompt], GREEDY)[0]
    assert short.outputs[0].token_ids == free[:4] and short.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_engine(model, max_model_len=10).add_request(None, list(range(10)), GREEDY)


def test_llm_from_checkpoint_folder_with_text(tiny_ckpt):
    from qwenlm.engine import LLM
    from qwenlm.model.loader import load_model
    from qwenlm.tokenizer import Tokenizer

    llm = LLM(str(tiny_ckpt), num_blocks=64, block_size=8)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate("Hello, Qwen!", p)[0]
    tok = Tokenizer.from_folder(tiny_ckpt)
    ref = reference_ids(load_model(tiny_ckpt), tok.encode("Hello, Qwen!"), p)
    assert out.prompt_token_ids == tok.encode("Hello, Qwen!")
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)


def test_engine_config_errors_name_the_field(model):
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="KV cache"):
        LLMEngine(model, None, EngineConfig(num_blocks=2, block_size=4)).add_request(None, list(range(9)), GREEDY)


def test_prompt_ids_outside_the_models_vocabulary_are_refused_before_any_step(model):
    """A token-id prompt is checked against the model's rows: such an id would fail the whole batch's step."""
    engine = tiny_engine(model)
    with pytest.raises(ParamError, match=r"prompt\[2\] is 1000, outside the vocabulary \(0..999\)") as e:
        engine.add_request(None, [1, 2, 1000], SamplingParams(max_tokens=2))
    assert e.value.field == "prompt" and not engine.has_unfinished()
    with pytest.raises(ParamError, match=r"prompt\[0\] is -3"):
        engine.generate([[-3, 4]], SamplingParams(max_tokens=2))
