"""The prefill CUDA graphs' padding and selection (qwenlm.engine.prefill_graphs), on the CPU: each bucket's "replay"
is the forward a graph captures, run eagerly on the static inputs. The engine through them gives the ids and
logprobs of the engine without them, for prompts alone, a prompt arriving while another decodes (the padding rows
must not touch its cache), a prefix-cache hit and prompt logprobs (both left to the plain path)."""

import pytest

from qwenlm.engine import SamplingParams
from qwenlm.engine.prefill_graphs import PrefillGraphs, prefill_graph_sizes
from tests.engine_helpers import assert_same_completions, random_prompts, tiny_engine, tiny_model

SIZES = [4, 8, 16, 32]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def with_graphs(model, **kw):
    """An engine whose runner takes the prefill-graph path, each bucket's forward run eagerly; and the buckets used."""
    engine = tiny_engine(model, **kw)
    runner, used = engine.runner, []
    graphs = runner.prefill_graphs = PrefillGraphs(runner, SIZES)
    for size in SIZES:
        graphs.replay[size] = lambda size=size: (used.append(size), graphs.forward(size))
    return engine, used


def staggered(engine, prompts, params):
    """prompts[0] alone, then each next one added after a decode step of those before: completions in order."""
    ids, done = [], {}
    for p in prompts:
        ids.append(engine.add_request(None, p, params))
        done.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i].outputs[0] for i in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=2)


def test_prompts_alone_match_the_plain_path_and_use_the_smallest_bucket(model):
    prompts = random_prompts([1, 3, 4, 5, 8, 13, 32, 33, 40])
    want = [tiny_engine(model).generate([p], GREEDY)[0].outputs[0] for p in prompts]
    engine, used = with_graphs(model)
    got = [engine.generate([p], GREEDY)[0].outputs[0] for p in prompts]
    assert_same_completions(got, want)
    assert used == [4, 4, 4, 8, 8, 16, 32]  # 33 and 40 tokens: past the largest bucket


def test_padding_rows_leave_other_sequences_caches_alone(model):
    """Each prompt's prefill runs padded while the earlier ones hold blocks and decode: their tokens are unchanged."""
    prompts = random_prompts([7, 3, 13, 2, 20], seed=1)
    want = staggered(tiny_engine(model), prompts, GREEDY)
    engine, used = with_graphs(model)
    assert_same_completions(staggered(engine, prompts, GREEDY), want)
    assert len(used) >= 3  # (two prompts that wait for the same step go in as one two-chunk prefill, unpadded)
    assert engine.runner.k_cache[:, -1].abs().sum() > 0  # the padding rows wrote into the scratch block alone


def test_a_prefix_hit_is_computed_again_into_the_scratch_slot_and_prompt_logprobs_take_the_plain_path(model):
    """After a prefix-cache hit the whole short prompt runs in a graph (the cached rows recomputed, their K/V stored
    into the scratch slot: the shared blocks are not written); prompt logprobs run unpadded."""
    (shared,) = random_prompts([8], seed=2)
    prompts = [shared + [5, 6], shared + [7]]  # the second hits the first's two full blocks (block size 4)
    logprobs = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    want_ref = tiny_engine(model)
    want = [want_ref.generate([p], GREEDY)[0].outputs[0] for p in prompts]
    want_prompt = want_ref.generate([prompts[0]], logprobs)[0]
    engine, used = with_graphs(model)
    got = [engine.generate([p], GREEDY)[0].outputs[0] for p in prompts]
    assert engine.stats()["prompt_tokens_total"] == 10 + 1  # the hit's 8 tokens were not scheduled again
    slots = engine.runner.prefill_graphs.flat[2, :9].tolist()  # the second prompt's, as its graph read them
    assert slots[:8] == [engine.runner.scratch_slot] * 8 and slots[8] < engine.runner.scratch_slot
    got_prompt = engine.generate([prompts[0]], logprobs)[0]
    assert_same_completions(got, want)
    assert got_prompt.prompt_logprobs[1:] == pytest.approx(want_prompt.prompt_logprobs[1:], abs=1e-4)
    assert used == [16, 16]


def test_bucket_sizes_follow_the_prefill_budget():
    assert prefill_graph_sizes(8192) == [16, 32, 64, 128, 256, 512]
    assert prefill_graph_sizes(100) == [16, 32, 64]
    assert prefill_graph_sizes(8) == []


def test_no_graphs_on_the_cpu_by_default(model):
    engine = tiny_engine(model)
    assert engine.runner.prefill_graphs is None or not engine.runner.prefill_graphs.replay
