"""Overlapped steps: step N+1 is launched from step N's tokens kept on the device before the host reads them.

Oracle: the single-request reference loop (qwenlm/generation.py) and the same engine with overlap_steps=False.
Each test also checks that the overlap really happened (a step was in flight when the host processed the one
before it), so a silent fallback to synchronous steps would fail them.
"""

import pytest

from engine_helpers import assert_same_completions, random_prompts, reference_ids, tiny_engine, tiny_model
from qwenlm.engine import SamplingParams
from qwenlm.engine.sequence import PENDING
from qwenlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def count_decode_launches(engine) -> list[int]:
    """Per launched decode step, its sequence ids (wraps runner.launch)."""
    launched = []
    launch = engine.runner.launch

    def spy(batch, prev=None):
        if not batch.is_prefill:
            launched.append([s.seq_id for s in batch.seqs])
        return launch(batch, prev)

    engine.runner.launch = spy
    return launched


def assert_no_leaks(engine):
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_stop_id_hit_while_next_step_in_flight(model):
    prompt = random_prompts([7], seed=21)[0]
    free = reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    s = next(i for i in range(3, 12) if free[i] not in free[:i])
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[s]])
    for overlap, extra in ((True, 1), (False, 0)):
        engine = tiny_engine(model, overlap_steps=overlap)
        launched = count_decode_launches(engine)
        out = engine.generate([prompt], params)[0].outputs[0]
        assert out.token_ids == free[:s] and out.finish_reason == "stop"
        # decode steps sample tokens 1..s; with overlap one more was already in flight and is discarded
        assert len(launched) == s + extra
        assert_no_leaks(engine)


def test_max_tokens_launches_no_wasted_step_and_equals_reference(model):
    prompts = random_prompts([5, 12, 3], seed=22)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 1)]
    engine = tiny_engine(model)
    launched = count_decode_launches(engine)
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == reference_ids(model, prompt, p)
        assert out.outputs[0].finish_reason == "length"
    seqs_per_request = [sum(sid in ids for ids in launched) for sid in sorted({i for ids in launched for i in ids})]
    assert sorted(seqs_per_request) == [3, 8]  # max_tokens - 1 decodes each; max_tokens=1 needs none
    assert_no_leaks(engine)


def test_stop_string_hit_while_next_step_in_flight():
    model, tok = tiny_model(vocab_size=151936), Tokenizer.from_file()
    prompt = tok.encode("Once upon a time there was")
    free = reference_ids(model, prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    pieces = [tok.decode([t]) for t in free]
    i = next(i for i in range(2, len(pieces)) if pieces[i].strip() and "\ufffd" not in pieces[i]
             and pieces[i] not in tok.decode(free[:i]))
    engine = tiny_engine(model, tok)
    launched = count_decode_launches(engine)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[pieces[i]])
    out = engine.generate([prompt], p)[0].outputs[0]
    text = tok.decode(free)
    assert out.finish_reason == "stop" and out.text == text[:text.index(pieces[i])]
    assert out.token_ids == free[:i + 1]
    assert len(launched) == i + 1  # decodes sampled tokens 1..i, plus the one in flight, discarded
    assert_no_leaks(engine)


def test_abort_during_in_flight_step_frees_blocks_at_once(model):
    engine = tiny_engine(model)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    pa, pb = random_prompts([10, 6], seed=23)
    a = engine.add_request(None, pa, long)
    b = engine.add_request(None, pb, long)
    for _ in range(5):
        engine.step()
    flying = engine._in_flight
    seq_a = engine.requests[a].seqs[0]
    assert flying is not None and seq_a in flying.sample_seqs and seq_a.num_pending == 1
    held = len(seq_a.block_table)
    free_before = engine.blocks.num_free_blocks
    out = engine.abort(a)
    assert engine.blocks.num_free_blocks == free_before + held
    got = out.outputs[0].token_ids
    assert out.finished and out.outputs[0].finish_reason == "abort" and PENDING not in got and got
    assert got == reference_ids(model, pa, long)[:len(got)]
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            final = o
    assert final.request_id == b and final.outputs[0].token_ids == reference_ids(model, pb, long)
    assert_no_leaks(engine)


def test_overlap_equals_synchronous_steps_for_mixed_requests(model):
    """Sampled and greedy rows, logprobs, repetition penalty (synchronous fallback), stop ids, chunked
    prefill arriving between decodes and preemption: token for token the same as without overlap (logprobs to
    LOGPROB_ATOL: the four runs batch the rows differently)."""
    prompts = random_prompts([9, 30, 4, 17, 22, 6], seed=24)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=14, logprobs=True),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=6, max_tokens=16, stop_token_ids=[17, 400, 901]),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=7, max_tokens=13, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, logprobs=True)]
    results = []
    for overlap in (True, False):
        for num_blocks in (64, 22):  # 22 blocks of 4: preemptions
            engine = tiny_engine(model, overlap_steps=overlap, num_blocks=num_blocks, max_num_batched_tokens=16)
            launched = count_decode_launches(engine)
            outs = engine.generate(prompts, params)
            results.append(outs)
            assert_no_leaks(engine)
            assert launched
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert_same_completions(got.outputs, want.outputs)
    assert results[0][1].outputs[0].token_ids == reference_ids(model, prompts[1], params[1])


def test_overlap_happens_in_steady_decode(model):
    engine = tiny_engine(model)
    prompts = random_prompts([5, 8], seed=25)
    for p in prompts:
        engine.add_request(None, p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    in_flight = 0
    while engine.has_unfinished():
        engine.step()
        in_flight += engine._in_flight is not None
        for seq in engine.scheduler.running:
            assert seq.num_pending <= 1
            assert PENDING not in seq.token_ids[:len(seq) - seq.num_pending]
    assert in_flight >= 6
    assert_no_leaks(engine)
