"""The reference generation loop: a left-padded batch on a contiguous KV cache (`DenseKVCache`).

It reproduces the official `generate` token for token (greedy) and is the oracle the paged engine is
tested against. Each row behaves as if it ran alone: positions count only its real tokens, and its
dynamic-NTK alpha is chosen from its own prompt length at prefill and frozen while decoding (spec §5.4).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwenlm.model.qwen import DenseKVCache, QWenLMHeadModel, ntk_alpha
from qwenlm.sampling import SamplingParams, process_logits


@dataclass
class StepToken:
    """One row's event in one step: a new token, or the reason the row ended."""

    token_id: int | None
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (a stop id) or "length"


def _row_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch: ids [B,T], valid [B,T] (False on padding), each token's true position [B,T]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        valid[b, T - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    return ids, valid, (valid.long().cumsum(1) - 1).clamp(min=0)


@torch.inference_mode()
def stream_tokens(model: QWenLMHeadModel, prompts: list[list[int]], params: list[SamplingParams],
                  stop_token_ids: set[int], pad_id: int = 151643) -> Iterator[list[StepToken | None]]:
    """Yield, per step, one StepToken per row (None once the row has ended in an earlier step).

    Stop ids end a row and are never reported as tokens. The caller may stop iterating at any time.
    """
    cfg = model.config
    device = model.lm_head.weight.device
    B = len(prompts)
    ids, valid, positions = left_pad(prompts, pad_id, device)
    alphas = [ntk_alpha(len(p), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0 for p in prompts]
    inv_freq = model.inv_freq(alphas, device)  # [B,1,r/2], frozen for the whole generation
    generators = [_row_generator(p, device) for p in params]
    seen = [torch.tensor(p, device=device) for p in prompts]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    produced = [0] * B
    alive = [True] * B

    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(valid)
    hidden = model(ids, positions, cache, inv_freq)[:, -1]  # [B,H]
    while True:
        logits = model.logits(hidden)  # [B,V] fp32
        events: list[StepToken | None] = []
        next_ids = torch.full((B,), pad_id, dtype=torch.long)
        for b in range(B):
            if not alive[b]:
                events.append(None)
                continue
            p = params[b]
            row = process_logits(logits[b], p, seen[b])
            if p.greedy:
                tok = int(row.argmax())
            else:
                tok = int(torch.multinomial(row.softmax(-1), 1, generator=generators[b]))
            logprob = float(torch.log_softmax(logits[b], -1)[tok]) if p.logprobs else None
            if tok in stop_token_ids and not p.ignore_eos:
                alive[b] = False
                events.append(StepToken(None, finish_reason="stop"))
                continue
            produced[b] += 1
            seen[b] = torch.cat((seen[b], torch.tensor([tok], device=device)))
            next_ids[b] = tok
            done = produced[b] >= p.max_tokens
            if done:
                alive[b] = False
            events.append(StepToken(tok, logprob, "length" if done else None))
        yield events
        if not any(alive):
            return
        step_valid = torch.tensor(alive, device=device)[:, None]
        cache.begin(step_valid)
        hidden = model(next_ids.to(device)[:, None], lengths[:, None].clone(), cache, inv_freq)[:, -1]
        lengths += 1


def generate_ids(model: QWenLMHeadModel, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 stop_token_ids: set[int]) -> list[list[int]]:
    """All generated ids per prompt (stop ids excluded)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    for events in stream_tokens(model, prompts, params, stop_token_ids):
        for b, ev in enumerate(events):
            if ev is not None and ev.token_id is not None:
                out[b].append(ev.token_id)
    return out
