"""SamplingParams, the rules every generation setting is checked by, and the reference (per-row, plain torch)
logits processing with transformers' semantics.

The Python API, the CLI, the terminal chat's `:conf`, generation_config.json and the server's request fields
all check values with the rules here, so a bad value is one `ParamError` naming the setting, raised before
any work starts. The engine's batched GPU sampler is tested against `process_logits` here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

# The engine's sampler holds seeds and top_k in int64 tensors: a larger value would fail the batched step
# of every request in it, so it is refused here.
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


class ParamError(ValueError):
    """A setting has the wrong type or value. `field` names it (the keyword argument, the
    generation_config.json key, the server request's field); the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _fail(name: str, allowed: str, value):
    raise ParamError(name, f"{name} must be {allowed}, got {value!r}")


def check_int(name: str, value, lo: int | None = None, allowed: str | None = None) -> int:
    """An integer (not a bool, not 2.5) >= lo that fits int64."""
    allowed = allowed or ("an integer" if lo is None else f"an integer >= {lo}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, allowed, value)
    value = int(value)
    if lo is not None and value < lo:
        _fail(name, allowed, value)
    if value > INT64_MAX:
        _fail(name, "at most 2**63 - 1 (int64)", value)
    return value


def check_real(name: str, value, ok, allowed: str) -> float:
    """A finite number (int or float, not a bool or a string) for which ok(value) holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not ok(value):
        _fail(name, allowed, value)
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(name, "true or false", value)
    return value


def check_seed(name: str, value) -> int | None:
    if value is None:
        return None
    return check_int(name, value, INT64_MIN, "an integer in [-2**63, 2**63 - 1] (int64)")


def wrap_seed(seed: int) -> int:
    """A seed derived by offsetting a valid one (seed + i), brought back into int64. The sampler uses only
    its low 32 bits, which wrapping keeps, so the draw is what the unwrapped value would give."""
    return (seed - INT64_MIN) % 2 ** 64 + INT64_MIN


def check_token_ids(name: str, value, label: str | None = None) -> list[int]:
    """A list of token ids; `label` is how the message shows the list (default: name)."""
    label = label or name
    if not isinstance(value, (list, tuple)):
        raise ParamError(name, f"{label} must be a list of token ids, got {value!r}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT64_MAX:
            raise ParamError(name, f"{label}[{i}] must be a token id (an integer >= 0), got {t!r}")
    return [int(t) for t in value]


def check_optional_int(name: str, value, lo: int) -> int | None:
    return None if value is None else check_int(name, value, lo)


def check_in_vocab(name: str, ids, n_vocab: int) -> None:
    """Every id one of the model's vocabulary, 0..n_vocab - 1 (known only where a request meets the model)."""
    if not ids or (min(ids) >= 0 and max(ids) < n_vocab):  # a long prompt: two passes in C
        return
    i, t = next((i, t) for i, t in enumerate(ids) if not 0 <= t < n_vocab)
    raise ParamError(name, f"{name}[{i}] is {t}, outside the vocabulary (0..{n_vocab - 1})")


def check_stop(name: str, value) -> list[str]:
    """Stop strings: one string or a list of them, none empty (an empty one would stop at once)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)):
        _fail(name, "a string or a list of strings", value)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ParamError(name, f"{name}[{i}] must be a non-empty string, got {s!r}")
    return list(stops)


# The sampling settings, by the name SamplingParams gives them; other names for the same setting
# (GenerationConfig's max_new_tokens, the server's max_completion_tokens) use these rules under their own name.
RULES = {
    "temperature": lambda n, v: check_real(n, v, lambda x: x >= 0, "a number >= 0 (0 means greedy)"),
    "top_p": lambda n, v: check_real(n, v, lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "top_k": lambda n, v: check_int(n, v, -1, "an integer >= -1 (0 or -1 disables)"),
    "repetition_penalty": lambda n, v: check_real(n, v, lambda x: x > 0, "a number > 0 (1 disables)"),
    "max_tokens": lambda n, v: check_int(n, v, 1),
    "n": lambda n, v: check_int(n, v, 1),
    "seed": check_seed,
    "stop": check_stop,
    "stop_token_ids": check_token_ids,
    "logprobs": check_bool,
    "top_logprobs": lambda n, v: check_int(n, v, 0),
    "prompt_logprobs": lambda n, v: check_optional_int(n, v, 0),
    "candidate_token_ids": check_token_ids,
    "ignore_eos": check_bool,
    "skip_special_tokens": check_bool,
}


def check_param(name: str, value, rule: str | None = None):
    """`value` checked by the rule for `rule` (default: `name`) and normalised (ints, floats, lists);
    a ParamError naming `name` otherwise."""
    return RULES[rule or name](name, value)


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
    logprobs: bool = False  # the logprob of each generated token (and of a stop token that ended it)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # With logprobs: also the top_logprobs most likely tokens at each generated position, as {id: logprob}.
    top_logprobs: int = 0
    # vLLM's prompt_logprobs: None = off; k >= 0 = the logprob of each prompt token given its prefix, and the k
    # most likely tokens at each prompt position (the first token has none: it has no prefix).
    prompt_logprobs: int | None = None
    # The logprobs of these ids at each generated position (multiple-choice scoring: the answer letters' ids).
    candidate_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in RULES:
            setattr(self, name, check_param(name, getattr(self, name)))
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs=True (as OpenAI's API asks)")

    def check_vocab(self, n_vocab: int) -> None:
        """Stop and candidate token ids must be ids of this model's vocabulary (checked where a request meets
        the model)."""
        check_in_vocab("stop_token_ids", self.stop_token_ids, n_vocab)
        check_in_vocab("candidate_token_ids", self.candidate_token_ids, n_vocab)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, gen, **overrides) -> "SamplingParams":
        """Map a GenerationConfig (do_sample/top_k/top_p/temperature/...) onto SamplingParams."""
        params = dict(
            temperature=gen.temperature if gen.do_sample else 0.0,
            top_p=gen.top_p,
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
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

