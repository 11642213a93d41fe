"""SamplingParams and the reference (per-row, plain torch) logits processing with transformers' semantics.

The engine's batched GPU sampler is tested against `process_logits` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be >= -1 (0 or -1 disables)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.n >= 1, "n must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, gen, **overrides) -> "SamplingParams":
        """Map a GenerationConfig (do_sample/top_k/top_p/temperature/...) onto SamplingParams."""
        params = dict(
            temperature=gen.temperature if gen.do_sample else 0.0,
            top_p=gen.top_p if gen.top_p is not None else 1.0,
            top_k=gen.top_k or 0,
            repetition_penalty=gen.repetition_penalty or 1.0,
            max_tokens=gen.max_new_tokens,
            seed=gen.seed,
        )
        params.update(overrides)
        return cls(**params)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor | None) -> torch.Tensor:
    """One row's fp32 logits [V] -> processed logits, as transformers' generate does it:
    repetition penalty (CTRL style, over prompt + generated ids), then temperature, top-k, top-p."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        ids = seen_ids.unique()
        score = logits[ids]
        score = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
        logits[ids] = score
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - params.top_p)
        remove[-1] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
    return logits

