"""Logprobs from the engine against the network computed directly: one forward of QWenLMHeadModel over the whole
sequence (DenseKVCache, the official single-prompt computation: NTK alpha from the prompt length, LogN past
seq_length), log_softmax at each position. Prompt logprobs (vLLM's prompt_logprobs) batched with other requests,
with prefix-cache hits present, with chunked prefill and past the NTK threshold; top-k and candidate-id logprobs
of generated tokens; the logprob of the stop token that ends a sample."""

import pytest
import torch

from engine_helpers import LOGPROB_ATOL, direct_log_softmax, random_prompts, tiny_engine, tiny_model
from qwenlm.engine import SamplingParams
from qwenlm.model.qwen import ntk_alpha
from qwenlm.sampling import ParamError


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ntk_model():
    # seq_length 32: prompts past it get NTK alpha 3, 7, ... and LogN scaling (spec §5.4, §6)
    return tiny_model(seq_length=32)


def assert_prompt_logprobs(out, lsm: torch.Tensor, k: int) -> None:
    prompt = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(prompt) == len(out.prompt_top_logprobs)
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    want = lsm[:len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), want, rtol=0, atol=LOGPROB_ATOL)
    top = torch.topk(lsm[:len(prompt) - 1], k, dim=1) if k else None
    for p, got in enumerate(out.prompt_top_logprobs[1:]):
        assert len(got) == k
        if k:
            assert list(got) == top.indices[p].tolist()
            torch.testing.assert_close(torch.tensor(list(got.values())), top.values[p], rtol=0, atol=LOGPROB_ATOL)


def test_prompt_logprobs_equal_the_direct_log_softmax_batched_with_other_requests(model):
    prompts = random_prompts([37, 5, 60, 12], seed=3)
    ks = [3, None, 0, 1]  # the second request asks for none: it keeps the last-position-only path
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=k) for k in ks]
    outs = tiny_engine(model).generate(prompts, params)
    for prompt, k, out in zip(prompts, ks, outs):
        if k is None:
            assert out.prompt_logprobs is None and out.prompt_top_logprobs is None
            continue
        assert_prompt_logprobs(out, direct_log_softmax(model, prompt), k)


def test_a_one_token_prompt_has_only_the_first_none(model):
    out = tiny_engine(model).generate([[7]], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None] and out.prompt_top_logprobs == [None]


def test_prompt_logprobs_are_computed_in_full_when_the_prefix_cache_holds_the_prompt(model):
    engine = tiny_engine(model)
    prompt = random_prompts([41], seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.generate([prompt], greedy)  # its blocks are now cached
    again = engine.generate([prompt], greedy)[0]
    assert again.num_cached_tokens == 40  # 10 blocks of 4: a plain request hits them
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert out.num_cached_tokens == 0  # its positions' logits are computed, not read from the cache
    assert_prompt_logprobs(out, direct_log_softmax(model, prompt), 2)
    # and it leaves its blocks for others: a longer prompt over the same prefix hits them
    longer = engine.generate([prompt + [1, 2, 3]], greedy)[0]
    assert longer.num_cached_tokens == 40


def test_prompt_logprobs_with_chunked_prefill(model):
    prompts = random_prompts([70, 33, 50], seed=9)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    engine = tiny_engine(model, max_num_batched_tokens=16)  # every prompt in chunks of <= 16 tokens
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        assert_prompt_logprobs(out, direct_log_softmax(model, prompt), 2)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompt_logprobs_of_preempted_and_recomputed_sequences_are_taken_once(model):
    prompts = random_prompts([14, 11, 16, 9], seed=5)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    engine = tiny_engine(model, num_blocks=16)  # 64 slots for ~100 tokens of demand
    outs = engine.generate(prompts, p)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(out, direct_log_softmax(model, prompt), 1)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompt_logprobs_past_the_ntk_threshold(ntk_model):
    cfg = ntk_model.config
    prompts = random_prompts([90, 20, 40], seed=11)
    assert [ntk_alpha(len(p), cfg.seq_length) for p in prompts] == [7.0, 1.0, 3.0]  # three alphas in one prefill
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    for engine in (tiny_engine(ntk_model), tiny_engine(ntk_model, max_num_batched_tokens=24)):
        for prompt, out in zip(prompts, engine.generate(prompts, params)):
            assert_prompt_logprobs(out, direct_log_softmax(ntk_model, prompt), 2)
    # the alpha matters: alpha 1 gives other logprobs past seq_length, so the check above can fail
    out = tiny_engine(ntk_model).generate([prompts[0]], params)[0]
    alpha1 = tiny_model(seq_length=32, use_dynamic_ntk=False)
    with pytest.raises(AssertionError):
        assert_prompt_logprobs(out, direct_log_softmax(alpha1, prompts[0]), 2)


def test_generated_top_logprobs_and_candidates_equal_the_direct_log_softmax(model):
    prompts = random_prompts([23, 8], seed=13)
    cands = [5, 999, 0]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=4,
                             candidate_token_ids=cands),
              SamplingParams(temperature=0.9, seed=3, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=2)]
    outs = tiny_engine(model).generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        c = out.outputs[0]
        lsm = direct_log_softmax(model, prompt + c.token_ids, len(prompt))[len(prompt) - 1:-1]  # [5,V]
        top = torch.topk(lsm, p.top_logprobs, dim=1)
        assert [list(t) for t in c.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([list(t.values()) for t in c.top_logprobs]), top.values,
                                   rtol=0, atol=LOGPROB_ATOL)
        chosen = lsm.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), chosen, rtol=0, atol=LOGPROB_ATOL)
        if p.greedy:  # the chosen token is the top-1: the very same number in both places
            assert c.logprobs == [next(iter(t.values())) for t in c.top_logprobs]
            torch.testing.assert_close(torch.tensor(c.candidate_logprobs), lsm[:, cands], rtol=0, atol=LOGPROB_ATOL)
        else:
            assert c.candidate_logprobs is None


def test_candidate_logprobs_without_logprobs_and_on_the_decode_path(model):
    prompt = random_prompts([15], seed=17)[0]
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, candidate_token_ids=[1, 2])
    c = tiny_engine(model).generate([prompt], p)[0].outputs[0]
    assert c.logprobs is None and c.top_logprobs is None and len(c.candidate_logprobs) == 4
    lsm = direct_log_softmax(model, prompt + c.token_ids, len(prompt))[len(prompt) - 1:-1]
    torch.testing.assert_close(torch.tensor(c.candidate_logprobs), lsm[:, [1, 2]], rtol=0, atol=LOGPROB_ATOL)


def test_the_stop_token_that_ends_a_sample_keeps_its_logprob(model):
    prompt = random_prompts([19], seed=19)[0]
    free = tiny_engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    stop = free[0].outputs[0].token_ids[1]
    p = SamplingParams(temperature=0, max_tokens=3, stop_token_ids=[stop], logprobs=True, top_logprobs=1)
    c = tiny_engine(model).generate([prompt], p)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_token_id == stop and len(c.token_ids) == 1
    lsm = direct_log_softmax(model, prompt + [c.token_ids[0], stop], len(prompt))[len(prompt) - 1:-1]
    assert len(c.logprobs) == len(c.top_logprobs) == 2
    torch.testing.assert_close(torch.tensor(c.logprobs), lsm.max(dim=1).values, rtol=0, atol=LOGPROB_ATOL)
    assert list(c.top_logprobs[1]) == [stop]


def test_n_samples_share_the_requests_prompt_logprobs(model):
    prompt = random_prompts([26], seed=23)[0]
    out = tiny_engine(model).generate([prompt], SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=2,
                                                               prompt_logprobs=1))[0]
    assert_prompt_logprobs(out, direct_log_softmax(model, prompt), 1)


def test_bad_logprob_settings_are_refused_before_any_work(model):
    with pytest.raises(ParamError, match="top_logprobs needs logprobs=True"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(ParamError, match="prompt_logprobs must be an integer >= 0"):
        SamplingParams(prompt_logprobs=-1)
    engine = tiny_engine(model)
    with pytest.raises(ValueError, match=r"candidate_token_ids\[1\] is 1000, outside the vocabulary"):
        engine.add_request(None, [1, 2], SamplingParams(candidate_token_ids=[3, 1000]))
    assert not engine.has_unfinished()


def test_prompt_logprobs_through_the_compiled_prefill_regions():
    # the GPU default (compile_decode): the prompt rows are read from the compiled regions' hidden states
    model = tiny_model()
    engine = tiny_engine(model, compile_decode=True, max_num_batched_tokens=24)
    assert engine.runner.compiled
    prompts = random_prompts([30, 9], seed=29)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        assert_prompt_logprobs(out, direct_log_softmax(model, prompt), 2)


def test_abort_in_the_middle_of_a_prompt_logprobs_prefill(model):
    engine = tiny_engine(model, max_num_batched_tokens=8)
    prompt = random_prompts([40], seed=31)[0]
    engine.add_request("r", prompt, SamplingParams(max_tokens=3, prompt_logprobs=1))
    engine.step()
    engine.step()  # two chunks launched, one or two processed (overlapped steps)
    out = engine.abort("r")
    n = len(out.prompt_logprobs)
    while engine.step():
        pass
    assert out.outputs[0].finish_reason == "abort" and 1 < n < len(prompt)
    assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == n  # the chunk in flight adds no late rows
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished()
