"""The engine-process wire (engine/wire.py): every step's RequestOutputs cross msgpack and come back equal to the
engine's own (all fields, running totals rebuilt from the deltas), while a step's message stays the size of
what the step added, not of everything generated so far."""

import copy

import pytest

from engine_helpers import random_prompts, tiny_engine, tiny_model
from qwenlm.engine import SamplingParams
from qwenlm.engine.wire import Failure, OutputPacker, OutputUnpacker, StepOut, event_decoder, event_encoder
from qwenlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(tiny_model(vocab_size=151936), Tokenizer.from_file(), max_num_batched_tokens=16)


def test_outputs_cross_the_wire_unchanged(engine):
    prompts = random_prompts([9, 30, 4], vocab=5000, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=["e"])]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    packer, unpacker = OutputPacker(), OutputUnpacker()
    sizes, steps, aborted = [], 0, False
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        if steps == 12 and not aborted:  # an abort's final output travels like any other
            aborted = True
            outs.append(engine.abort("r1"))
        want = copy.deepcopy(outs)
        wire = event_encoder.encode(StepOut([packer.pack(o) for o in outs], [Failure("x", "why", True)], {"a": 1}))
        sizes.append((sum(len(o.outputs[0].token_ids) for o in want), len(wire)))
        got = event_decoder.decode(wire)
        assert got.failures == [Failure("x", "why", True)] and got.stats == {"a": 1}
        assert [unpacker.unpack(o) for o in got.outputs] == want
    # finished requests leave no state behind
    assert aborted and not packer._sent and not unpacker._totals and not unpacker._prompt
    # The message of a late step is about the size of an early one (prompt ids, token ids, logprobs and text are
    # sent once).
    early = next(size for tokens, size in sizes if tokens >= 3)
    assert max(size for _, size in sizes[-5:]) < 2 * early
