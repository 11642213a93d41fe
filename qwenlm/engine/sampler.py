"""The batched sampler: one pass over [B, V] fp32 logits with per-row parameters, on the logits' device.

Semantics equal `qwenlm.sampling.process_logits` row by row (repetition penalty over prompt + output,
then temperature, top-k, top-p; greedy rows take the argmax of the penalized logits). The random draw
is the exponential race (argmax of p / E, E ~ Exp(1), equivalent to sampling from p) with E computed
from a counter-based hash of (request seed, position, token id): reproducible per request whatever the
batch around it, no generator state, no host sync. Host syncs: one `.tolist()` per step for the whole
batch, done by the caller.
"""

from __future__ import annotations

import torch

from qwenlm.engine.sequence import Sequence

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (Chris Wellons' hash-prospector) on uint32 values held in int64;
    # products may wrap past 2**63 but the low 32 bits, which are all we keep, stay exact.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """E ~ Exp(1) of shape [B, V], a pure function of (seed, position, token id)."""
    dev = seeds.device
    row = _mix32((_mix32(seeds & _M32) ^ (positions * 0x9E3779B1 & _M32)) & _M32)  # [B]
    col = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = _mix32(row[:, None] ^ _mix32(col * 0x85EBCA77 & _M32)[None, :])  # [B,V]
    u = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(u)


def sampling_rows(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row parameters on the host: float32 [B, 4] (temperature, top_p, penalty, greedy) and int64 [B, 3]
    (top_k, seed, position). The engine builds a request's row once at admission, so a value that cannot be
    represented fails that request alone instead of a whole step."""
    ps = [s.params for s in seqs]
    floats = torch.tensor([[p.temperature if not p.greedy else 1.0, p.top_p, p.repetition_penalty,
                            1.0 if p.greedy else 0.0] for p in ps], dtype=torch.float32)
    ints = torch.tensor([[max(p.top_k, 0) if not p.greedy else 0, s.seed, len(s)] for s, p in zip(seqs, ps)],
                        dtype=torch.int64)
    return floats, ints


class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (built once per step)."""

    def __init__(self, seqs: list[Sequence], device):
        ps = [s.params for s in seqs]
        self.seqs = seqs
        self.all_greedy = all(p.greedy for p in ps)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in ps)
        self.any_top_k = any(p.top_k > 0 and not p.greedy for p in ps)
        self.any_top_p = any(p.top_p < 1.0 and not p.greedy for p in ps)
        self.want_logprobs = any(p.logprobs or p.candidate_token_ids for p in ps)
        self.max_top_k = max((p.top_k for p in ps if not p.greedy), default=0)
        # Logprob details beyond the chosen token's: the widest top-k and candidate list of the batch.
        self.max_top_logprobs = max((p.top_logprobs for p in ps), default=0)
        self.max_candidates = max((len(p.candidate_token_ids) for p in ps), default=0)
        self.fast_greedy = self.all_greedy and not self.any_penalty and not self.want_logprobs
        if self.fast_greedy:
            return  # argmax only: no per-row tensors to build or copy
        floats, ints = sampling_rows(seqs)
        floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
        self.temperature, self.top_p, self.penalty, self.greedy = floats.unbind(1)
        self.greedy = self.greedy.bool()
        self.top_k, self.seed, self.position = ints.unbind(1)


def apply_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows = [i for i, s in enumerate(batch.seqs) if s.params.repetition_penalty != 1.0]
    width = max(len(batch.seqs[i]) for i in rows)
    # Pad each row's seen ids with its first id: a repeated index rewrites the same value.
    ids = torch.tensor([s.token_ids + [s.token_ids[0]] * (width - len(s)) for s in (batch.seqs[i] for i in rows)],
                       dtype=torch.int64).to(logits.device, non_blocking=True)
    rows_t = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
    sub = logits.index_select(0, rows_t)
    score = sub.gather(1, ids)
    pen = batch.penalty.index_select(0, rows_t)[:, None]
    score = torch.where(score < 0, score * pen, score / pen)
    logits.index_copy_(0, rows_t, sub.scatter(1, ids, score))
    return logits


def process_logits_batched(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B,V] fp32 -> processed logits (the batched twin of qwenlm.sampling.process_logits)."""
    logits = logits.float().clone()
    if batch.any_penalty:
        logits = apply_penalty(logits, batch)
    if batch.all_greedy:
        return logits
    greedy_rows = logits
    logits = logits / batch.temperature[:, None]
    if batch.any_top_k:
        k = batch.top_k.clamp(max=logits.shape[1])
        top = torch.topk(logits, min(batch.max_top_k, logits.shape[1]), dim=1).values  # [B,kmax]
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if batch.any_top_p:
        sorted_logits, sorted_idx = torch.sort(logits, dim=1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - batch.top_p)[:, None]
        remove[:, -1] = False
        remove &= (batch.top_p < 1.0)[:, None]
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.where(batch.greedy[:, None], greedy_rows, logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chosen token ids [B] (and, when asked for, their logprobs under the model's raw distribution,
    as the reference loop in qwenlm/generation.py reports them)."""
    if batch.fast_greedy:
        return logits.argmax(dim=1), None
    processed = process_logits_batched(logits, batch)
    tokens = processed.argmax(dim=1)
    if not batch.all_greedy:
        probs = processed.softmax(dim=1)
        noise = exponential_noise(batch.seed, batch.position, logits.shape[1])
        drawn = (probs / noise).argmax(dim=1)
        tokens = torch.where(batch.greedy, tokens, drawn)
    logprobs = None
    if batch.want_logprobs:
        logprobs = logits.float().log_softmax(dim=1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def logprob_details(logits: torch.Tensor, batch: SamplingBatch, tokens: torch.Tensor) -> torch.Tensor | None:
    """float64 [1 + 2k + c, B] (k = batch.max_top_logprobs, c = batch.max_candidates): the chosen tokens'
    logprobs, the top-k ids, their logprobs, and the logprobs of each row's candidate ids (rows padded with id
    0), all from one log_softmax of the raw logits, so a chosen token that is the top-1 has the same number in
    both places. None when no row asks for top-k or candidates (`sample` gives the chosen logprobs then)."""
    k, c = min(batch.max_top_logprobs, logits.shape[1]), batch.max_candidates
    if not k and not c:
        return None
    lsm = logits.float().log_softmax(dim=1)  # [B,V]
    rows = [lsm.gather(1, tokens[:, None])[:, 0].double()[None]]  # [1,B]
    if k:
        top = torch.topk(lsm, k, dim=1)  # [B,k]
        rows += [top.indices.double().T, top.values.double().T]
    if c:
        ids = [s.params.candidate_token_ids + [0] * (c - len(s.params.candidate_token_ids)) for s in batch.seqs]
        ids_t = torch.tensor(ids, dtype=torch.int64).to(logits.device, non_blocking=True)
        rows.append(lsm.gather(1, ids_t).double().T)  # [c,B]
    return torch.cat(rows)


def unpack_details(column: list[float], params, k: int) -> tuple[float, dict[int, float] | None, list[float] | None]:
    """One row's column of `logprob_details` (k: the step's top-k width) -> (chosen logprob, its own top-k as
    {id: logprob} best first, or None, its candidates' logprobs, or None)."""
    top = None
    if params.top_logprobs:
        n = params.top_logprobs
        top = {int(i): lp for i, lp in zip(column[1:1 + n], column[1 + k:1 + k + n])}
    cands = None
    if params.candidate_token_ids:
        cands = column[1 + 2 * k:1 + 2 * k + len(params.candidate_token_ids)]
    return column[0], top, cands


def prompt_logprob_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """float64 [N, 1 + 2k] for N prompt positions: the logprob of the next prompt token (`targets` [N]), then
    the top-k ids and their logprobs (logits [N,V] fp32 of those positions)."""
    lsm = logits.float().log_softmax(dim=1)
    cols = [lsm.gather(1, targets[:, None]).double()]
    if k:
        top = torch.topk(lsm, min(k, lsm.shape[1]), dim=1)
        cols += [top.indices.double(), top.values.double()]
    return torch.cat(cols, dim=1)
