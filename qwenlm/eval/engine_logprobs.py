"""The engine's `next_token_logprobs` backend: each prompt is one prefill through the LLMEngine, scored from
the last position's logprobs of the candidate ids (`SamplingParams.candidate_token_ids`, one token computed and
not used), with the few-shot prefix that a subject's prompts share computed once and then served from the
prefix cache.

The distribution is the one `model_logprobs` computes with a padded forward (the tests compare the two), with
the official scripts' truncation rule.
"""
from __future__ import annotations

from qwenlm.engine import LLMEngine, SamplingParams
from qwenlm.eval.choice import NextTokenLogprobs
from qwenlm.eval.model_logprobs import MAX_SEQ_LEN, truncate_left
from qwenlm.tokenizer import Tokenizer


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def engine_next_token_logprobs(engine: LLMEngine, tokenizer: Tokenizer,
                               max_seq_len: int = MAX_SEQ_LEN) -> NextTokenLogprobs:
    warm: list[int] = []  # the last prompt run alone: its full blocks are in the prefix cache

    def next_token_logprobs(prompts: list[str], candidate_ids: list[int]) -> list[list[float]]:
        nonlocal warm
        # allowed_special="all": the official QWenTokenizer's default for these plain-text prompts
        encoded = [truncate_left(tokenizer.encode(p, allowed_special="all"), max_seq_len) for p in prompts]
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, candidate_token_ids=list(candidate_ids))
        if not encoded:
            return []
        outs = []
        # Prompts admitted in one step cannot hit each other's blocks. When the prefix this batch shares is not
        # cached yet, the first prompt runs alone first; the others then compute only their own questions.
        shared = _common_prefix(encoded[0], encoded[1]) if len(encoded) > 1 else 0
        if shared > _common_prefix(encoded[0], warm):
            outs = engine.generate([encoded[0]], params)
            warm, encoded = encoded[0], encoded[1:]
        outs += engine.generate(encoded, params)
        return [out.outputs[0].candidate_logprobs[0] for out in outs]
    return next_token_logprobs
