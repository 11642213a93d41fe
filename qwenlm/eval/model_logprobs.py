"""A plain `next_token_logprobs` backend: one forward of `QWenLMHeadModel` per batch of left-padded prompts.

The official scripts run one prompt at a time (no padding); left padding with a validity mask and
per-row positions computes the same last-position distribution, which the tests check.
"""
from __future__ import annotations

import torch

from qwenlm.eval.choice import NextTokenLogprobs
from qwenlm.generation import left_pad
from qwenlm.model.qwen import DenseKVCache, QWenLMHeadModel, ntk_alpha
from qwenlm.tokenizer import Tokenizer

MAX_SEQ_LEN = 2048  # evaluate_mmlu.py --max-seq-len default


def truncate_left(ids: list[int], max_seq_len: int) -> list[int]:
    """evaluate_mmlu.py's rule: a prompt longer than max_seq_len keeps its last max_seq_len - 1 tokens."""
    return ids[len(ids) - max_seq_len + 1:] if len(ids) > max_seq_len else ids


@torch.inference_mode()
def last_position_logprobs(model: QWenLMHeadModel, prompts: list[list[int]], pad_id: int = 151646) -> torch.Tensor:
    """log_softmax of the next-token logits after each prompt, [B,V] fp32 (pad: <|extra_0|>, as officially)."""
    cfg = model.config
    device = model.lm_head.weight.device
    ids, valid, positions = left_pad(prompts, pad_id, device)
    # Each row's NTK alpha from its own length: what a one-prompt forward of the official model uses.
    alphas = [ntk_alpha(len(p), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0 for p in prompts]
    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(valid)
    hidden = model(ids, positions, cache, model.inv_freq(alphas, device))[:, -1]  # [B,H]
    return torch.log_softmax(model.logits(hidden), dim=-1)  # [B,V]


def model_next_token_logprobs(model: QWenLMHeadModel, tokenizer: Tokenizer, max_seq_len: int = MAX_SEQ_LEN,
                              batch_size: int = 8) -> NextTokenLogprobs:
    def next_token_logprobs(prompts: list[str], candidate_ids: list[int]) -> list[list[float]]:
        # allowed_special="all": the official QWenTokenizer's default for these plain-text prompts
        encoded = [truncate_left(tokenizer.encode(p, allowed_special="all"), max_seq_len) for p in prompts]
        out = []
        for start in range(0, len(encoded), batch_size):
            lp = last_position_logprobs(model, encoded[start:start + batch_size])
            out.extend(lp[:, candidate_ids].tolist())
        return out
    return next_token_logprobs
