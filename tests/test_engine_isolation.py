"""One request can never break the others: a request whose sampling row cannot be built fails at add, one
whose detokenizing / stop handling raises fails alone mid-step, a failed add fails that stream alone, and
stop_all / shutdown end every open stream instead of leaving it waiting."""

import asyncio

import pytest

from engine_helpers import EXPLODE_SEED, break_text_handling, random_prompts, reference_ids, tiny_engine, \
    tiny_model
from qwenlm.engine import AsyncEngine, SamplingParams
from qwenlm.engine.outputs import EngineStopped, RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


EXPLODING = SamplingParams(temperature=0, max_tokens=12, seed=EXPLODE_SEED)


@pytest.fixture
def exploding_text(monkeypatch):
    break_text_handling(monkeypatch)


def test_unbuildable_sampling_row_fails_at_add_and_the_step_goes_on(model):
    engine = tiny_engine(model)
    good, bad = random_prompts([9, 7], seed=51)
    engine.add_request("good", good, GREEDY)
    engine.step()
    params = SamplingParams(temperature=1.0, max_tokens=4)
    object.__setattr__(params, "top_k", 2 ** 70)  # past validation: no int64 holds it
    with pytest.raises(ValueError, match="sampling parameters"):
        engine.add_request("bad", bad, params)
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step())
    assert list(final) == ["good"] and final["good"].outputs[0].token_ids == reference_ids(model, good, GREEDY)


def test_seed_offsets_of_n_samples_wrap_into_int64(model):
    prompt = random_prompts([8], seed=52)[0]
    big = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True, n=3, seed=2 ** 63 - 1)
    outs = tiny_engine(model).generate([prompt, prompt], [big, GREEDY])
    assert [len(o.token_ids) for o in outs[0].outputs] == [5, 5, 5]
    assert outs[1].outputs[0].token_ids == reference_ids(model, prompt, GREEDY)
    again = tiny_engine(model).generate([prompt], big)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in outs[0].outputs]


def test_text_handling_failure_fails_its_request_alone(model, exploding_text):
    engine = tiny_engine(model)
    good, bad = random_prompts([9, 7], seed=53)
    engine.add_request("good", good, GREEDY)
    engine.add_request("bad", bad, SamplingParams(temperature=0, max_tokens=12, n=2, seed=EXPLODE_SEED))
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert final["bad"].error == "UnicodeError: detokenizer broke"
    assert [o.finish_reason for o in final["bad"].outputs] == ["error", "error"]
    assert final["good"].error is None and final["good"].outputs[0].token_ids == reference_ids(model, good, GREEDY)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    with pytest.raises(RequestError, match="detokenizer broke"):  # the batch API does not hide a failure
        engine.generate([good, bad], [GREEDY, EXPLODING])


def _consume(engine, req, started: asyncio.Event | None = None):
    """The stream's outputs, or the RequestError it raised."""
    async def run():
        outs = []
        try:
            async for out in engine.stream(req):
                outs.append(out)
                if started is not None:
                    started.set()
        except RequestError as e:
            return e
        return outs
    return run()


def test_async_failures_reach_only_their_own_stream(model, exploding_text, monkeypatch):
    core = tiny_engine(model)
    add = core.add

    def add_or_fail(req):
        if req.request_id == "unaddable":
            raise RuntimeError("add failed")
        add(req)

    monkeypatch.setattr(core, "add", add_or_fail)
    engine = AsyncEngine(core)
    good, bad = random_prompts([9, 7], seed=54)

    async def main():
        reqs = [engine.make_request(good, GREEDY, "good"), engine.make_request(bad, GREEDY, "unaddable"),
                engine.make_request(bad, EXPLODING, "exploding")]
        return await asyncio.wait_for(asyncio.gather(*(_consume(engine, r) for r in reqs)), 60)

    try:
        ok, unaddable, exploding = asyncio.run(main())
        assert ok[-1].finished and ok[-1].outputs[0].token_ids == reference_ids(model, good, GREEDY)
        assert isinstance(unaddable, RequestError) and "add failed" in str(unaddable)
        assert isinstance(exploding, RequestError) and "detokenizer broke" in str(exploding)
        again = asyncio.run(_consume(engine, engine.make_request(good, GREEDY)))  # the engine thread lives on
        assert again[-1].outputs[0].token_ids == ok[-1].outputs[0].token_ids
    finally:
        engine.shutdown()


def test_stop_all_and_shutdown_end_every_stream(model):
    engine = AsyncEngine(tiny_engine(model, num_blocks=2048))
    long = SamplingParams(temperature=0, max_tokens=8000, ignore_eos=True)
    prompts = random_prompts([5, 6], seed=55)

    async def running(prompt):
        started = asyncio.Event()
        task = asyncio.ensure_future(_consume(engine, engine.make_request(prompt, long), started))
        await asyncio.wait_for(started.wait(), 30)
        return task

    async def main():
        tasks = [await running(p) for p in prompts]
        engine.stop_all("going away")
        first = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        task = await running(prompts[0])
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        return first, await asyncio.wait_for(task, 30)

    (a, b), c = asyncio.run(main())
    for err in (a, b, c):
        assert isinstance(err, EngineStopped)
    assert "going away" in str(a) and "shut down" in str(c)
    core = engine.engine
    assert not core.requests and core.blocks.num_free_blocks == core.blocks.num_blocks
    assert isinstance(asyncio.run(_consume(engine, engine.make_request(prompts[0], long))), EngineStopped)


def test_python_api_raises_for_a_failed_request_instead_of_a_cut_reply(tiny_ckpt, monkeypatch):
    import qwenlm
    llm = qwenlm.load(str(tiny_ckpt), device="cpu")
    break_text_handling(monkeypatch)
    with pytest.raises(RuntimeError, match="generation failed: .*detokenizer broke"):
        llm.generate("Hello", seed=EXPLODE_SEED, max_new_tokens=8, ignore_eos=True)
    assert llm.generate("Hello", seed=1, max_new_tokens=8) is not None  # the engine goes on
