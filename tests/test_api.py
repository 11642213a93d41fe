"""The Python API on a tiny checkpoint: chat, chat_stream, generate, stops, seeds, per-call overrides."""

import pytest

import qwenlm
from qwenlm.chat import build_chat_prompt
from qwenlm.generation import generate_ids
from qwenlm.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)


def test_chat_returns_stripped_reply_and_new_history(llm):
    history = [("hi", "hello")]
    reply, new_history = llm.chat("你好", history=history, max_new_tokens=8, temperature=0)
    assert history == [("hi", "hello")]  # caller's list untouched
    assert new_history == history + [("你好", reply)] and reply == reply.strip()
    _, ids = build_chat_prompt(llm.tokenizer, "你好", history)
    greedy = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.1)
    expected = generate_ids(llm.model, [ids], greedy, {151643, 151644, 151645})[0]
    assert reply == llm.tokenizer.decode(expected).strip()


def test_chat_stream_deltas_join_to_chat_reply(llm):
    deltas = list(llm.chat_stream("Tell me a story", max_new_tokens=12, seed=7))
    reply, _ = llm.chat("Tell me a story", max_new_tokens=12, seed=7)
    assert "".join(deltas).strip() == reply and len(deltas) > 1


def test_seeded_sampling_is_reproducible_and_seed_matters(llm):
    a = llm.generate("Once upon", max_new_tokens=10, seed=3)
    assert a == llm.generate("Once upon", max_new_tokens=10, seed=3)
    assert a != llm.generate("Once upon", max_new_tokens=10, seed=4)


def test_max_new_tokens_override(llm):
    text = llm.generate("Hello", max_new_tokens=5, temperature=0)
    assert len(llm.tokenizer.encode(text)) <= 6  # re-encoding can merge, never more than +1 here
    ids = generate_ids(llm.model, [llm.tokenizer.encode("Hello")], SamplingParams(temperature=0, max_tokens=5,
                       repetition_penalty=1.1), {151643})[0]
    assert len(ids) == 5 and text == llm.tokenizer.decode(ids)


def test_stop_string_spanning_tokens_is_cut(llm):
    full_ids = generate_ids(llm.model, [llm.tokenizer.encode("Hello")],
                            SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.1), {151643})[0]
    pieces = [llm.tokenizer.decode([i]) for i in full_ids]
    # a stop made of the end of token 3 and the start of token 4
    stop = pieces[3][-1:] + pieces[4][:1]
    full = "".join(pieces)
    text = llm.generate("Hello", max_new_tokens=10, temperature=0, stop=[stop])
    assert text == full[: full.find(stop)] and stop not in text


def test_stop_token_ids_end_generation(llm):
    ids = generate_ids(llm.model, [llm.tokenizer.encode("Hello")],
                       SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.1), {151643})[0]
    text = llm.generate("Hello", max_new_tokens=6, temperature=0, stop_token_ids=[ids[2]])
    assert text == llm.tokenizer.decode(ids[:2])


def test_batch_generate_equals_single(llm):
    prompts = ["Hello world", "一", "def f(x):\n    return"]
    batch = llm.generate(prompts, max_new_tokens=6, temperature=0)
    assert batch == [llm.generate(p, max_new_tokens=6, temperature=0) for p in prompts]


def test_special_token_text_in_query_cannot_end_the_turn(llm):
    _, ids = build_chat_prompt(llm.tokenizer, "<|im_end|>")
    assert ids.count(151645) == 2
