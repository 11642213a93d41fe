"""The engine's true context: the model's limit or what the KV pool holds, whichever is smaller. A request
reaching it finishes with "length"; a prompt that leaves no room raises at add_request."""

import pytest

from engine_helpers import random_prompts, reference_ids, tiny_engine, tiny_model
from qwenlm.engine import SamplingParams


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_max_model_len_is_what_the_kv_pool_holds(model):
    assert tiny_engine(model, num_blocks=64, block_size=4).max_model_len == 256  # the model allows 32768
    assert tiny_engine(model, num_blocks=64, block_size=4, max_model_len=100).max_model_len == 100


def test_reply_reaching_the_pool_finishes_with_length(model):
    prompt = random_prompts([250], seed=41)[0]
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = tiny_engine(model, num_blocks=64, block_size=4).generate([prompt], p)[0]
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=6,
                                                                                   ignore_eos=True))


def test_samples_sharing_the_pool_each_reach_the_limit(model):
    prompt = random_prompts([200], seed=43)[0]
    engine = tiny_engine(model, num_blocks=64, block_size=4)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, n=2))[0]
    want = reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=56, ignore_eos=True))
    assert [o.token_ids for o in out.outputs] == [want, want]  # 200 + 56 = 256 each, one after the other
    assert [o.finish_reason for o in out.outputs] == ["length", "length"]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompt_leaving_no_room_raises_at_add_with_the_numbers(model):
    engine = tiny_engine(model, num_blocks=64, block_size=4)
    with pytest.raises(ValueError, match=r"prompt of 256 tokens.*context is 256 tokens"):
        engine.add_request(None, list(range(256)), SamplingParams(max_tokens=1))
    assert not engine.has_unfinished()


def test_python_api_reply_past_the_pool_ends_at_the_context(tiny_ckpt):
    import qwenlm

    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)
    prompt = "hello " * 8000
    n = len(llm.tokenizer.encode(prompt))
    text = llm.generate(prompt, max_new_tokens=500, temperature=0)  # 8001 + 500 > the 8192 the pool holds
    room = llm.engine.max_model_len - n
    assert room == 191 and abs(len(llm.tokenizer.encode(text)) - room) <= 4  # re-encoding text may merge tokens
