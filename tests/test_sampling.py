"""Logits processing has transformers' semantics: compared with its own processors and warpers."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from qwenlm.config import GenerationConfig
from qwenlm.sampling import ParamError, SamplingParams, process_logits


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 0.8, 1.1), (0.7, 50, 1.0, 1.0), (1.3, 20, 0.5, 1.3), (0.5, 0, 0.95, 1.05)])
def test_matches_transformers_processors(temperature, top_k, top_p, penalty):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=gen) * 3
    seen = torch.randint(0, 1000, (1, 40), generator=gen)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone()) if penalty != 1.0 else logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(seen, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(seen, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(seen, ref)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = process_logits(logits[0], params, seen[0])
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
    finite = ~torch.isinf(ours)
    torch.testing.assert_close(ours[finite], ref[0][finite])


def test_generation_config_defaults_and_mapping():
    gen = GenerationConfig()
    assert (gen.chat_format, gen.top_p, gen.top_k, gen.repetition_penalty, gen.max_new_tokens, gen.max_window_size,
            gen.eos_token_id, gen.pad_token_id) == ("chatml", 0.8, 0, 1.1, 512, 6144, 151643, 151643)
    p = SamplingParams.from_generation_config(gen)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (1.0, 0.8, 0, 1.1, 512)
    assert SamplingParams.from_generation_config(gen.replace(do_sample=False)).greedy
    with pytest.raises(ValueError, match="unknown generation setting"):
        gen.replace(top_q=1)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(n=0)])
def test_bad_params_rejected(bad):
    with pytest.raises(ParamError) as e:
        SamplingParams(**bad)
    assert e.value.field == next(iter(bad)) and isinstance(e.value, ValueError)
