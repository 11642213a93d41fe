"""The batched sampler against qwenlm.sampling's per-row reference, and seeded sampling in the engine."""

import pytest
import torch

from engine_helpers import random_prompts, reference_ids, tiny_engine, tiny_model
from qwenlm.engine import SamplingParams
from qwenlm.engine.sampler import SamplingBatch, exponential_noise, process_logits_batched, sample
from qwenlm.engine.sequence import Sequence
from qwenlm.sampling import process_logits

MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.5, repetition_penalty=1.3),
    SamplingParams(temperature=0, repetition_penalty=1.2),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_k=1),
]


def _seqs(params, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Sequence("r", 0, torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist(), p, seed=i, ntk_alpha=1.0)
            for i, p in enumerate(params)]


def test_batched_processing_equals_reference_rows():
    vocab = 300
    logits = torch.randn(len(MIXED), vocab, generator=torch.Generator().manual_seed(1)) * 3
    seqs = _seqs(MIXED, vocab)
    got = process_logits_batched(logits, SamplingBatch(seqs, "cpu"))
    for i, (seq, p) in enumerate(zip(seqs, MIXED)):
        want = process_logits(logits[i], p, torch.tensor(seq.token_ids))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: different tokens filtered"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[i][finite], want[finite], rtol=1e-6, atol=1e-6)


def test_greedy_rows_take_penalized_argmax_and_logprobs_are_raw():
    vocab = 200
    logits = torch.randn(len(MIXED), vocab, generator=torch.Generator().manual_seed(2))
    seqs = _seqs(MIXED, vocab)
    tokens, logprobs = sample(logits, SamplingBatch([s for s in seqs], "cpu"))
    for i in (0, 4, 6):
        want = process_logits(logits[i], MIXED[i], torch.tensor(seqs[i].token_ids)).argmax()
        assert tokens[i] == want
    assert logprobs is None
    for s in seqs:
        s.params = SamplingParams(temperature=0, logprobs=True)
    tokens, logprobs = sample(logits, SamplingBatch(seqs, "cpu"))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_exponential_race_draws_from_the_distribution():
    vocab, draws = 8, 20000
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    noise = exponential_noise(torch.full((draws,), 1234), torch.arange(draws), vocab)
    picks = (probs[None, :] / noise).argmax(1)
    freq = torch.bincount(picks, minlength=vocab).float() / draws
    assert (freq - probs).abs().max() < 0.015
    again = exponential_noise(torch.full((draws,), 1234), torch.arange(draws), vocab)
    assert torch.equal(noise, again)
    assert not torch.equal(noise, exponential_noise(torch.full((draws,), 1235), torch.arange(draws), vocab))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_seeded_sampling_reproducible_and_independent_of_batch(model):
    prompts = random_prompts([7, 12, 5], seed=21)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=42, ignore_eos=True)
    alone = tiny_engine(model).generate([prompts[1]], seeded)[0].outputs[0].token_ids
    mixed_params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), seeded,
                    SamplingParams(temperature=0.8, top_k=3, max_tokens=3, ignore_eos=True, n=2, seed=7)]
    outs = tiny_engine(model).generate(prompts, mixed_params)
    assert outs[1].outputs[0].token_ids == alone
    assert outs[0].outputs[0].token_ids == reference_ids(model, prompts[0], mixed_params[0])
    assert [len(o.token_ids) for o in outs[2].outputs] == [3, 3]  # n=2, max_tokens honoured per request
    assert len(outs[0].outputs[0].token_ids) == 5
    # top_k=3: every token is among the three best under the reference processing
    for o in outs[2].outputs:
        seq_ids = list(prompts[2])
        for tok in o.token_ids:
            logits = _next_logits(model, seq_ids)
            assert tok in torch.topk(logits, 3).indices.tolist()
            seq_ids.append(tok)
    again = tiny_engine(model).generate(prompts, mixed_params)
    assert [o.outputs[i].token_ids for o in again for i in range(len(o.outputs))] == \
           [o.outputs[i].token_ids for o in outs for i in range(len(o.outputs))]


def test_unseeded_requests_differ_and_n_samples_share_the_prompt(model):
    prompt = random_prompts([20], seed=23)[0]
    p = SamplingParams(temperature=1.5, max_tokens=6, ignore_eos=True, n=4)
    engine = tiny_engine(model)
    out = engine.generate([prompt], p)[0]
    samples = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(samples)) > 1
    # siblings wait for sample 0 to prefill, then take its 5 full blocks (16 tokens; the rest recomputed)
    assert engine.blocks.hit_rate == pytest.approx(3 * 16 / (4 * 20))


def _next_logits(model, ids):
    from qwenlm.model.qwen import DenseKVCache

    cache = DenseKVCache(model.config.num_hidden_layers)
    t = torch.tensor([ids])
    cache.begin(torch.ones_like(t, dtype=torch.bool))
    with torch.inference_mode():
        h = model(t, torch.arange(len(ids))[None], cache, model.inv_freq([1.0], "cpu"))
        return model.logits(h[0, -1])
