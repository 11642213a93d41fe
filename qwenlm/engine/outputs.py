"""What the engine hands back per request; the contract between the engine and its callers (chat, server)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)  # all generated ids so far (stop tokens excluded)
    text: str = ""  # all text so far, stop strings cut, never a broken UTF-8 character
    text_delta: str = ""  # text added by this step
    # Logprob of each chosen token, when asked for; one more at the end when a stop token id ended the sample
    # (`stop_token_id`, which token_ids leave out), as vLLM counts it.
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    # The entries below are plain lists and dicts (ids, floats), one per entry of `logprobs`.
    top_logprobs: list[dict[int, float]] | None = None  # params.top_logprobs most likely {id: logprob}, best first
    candidate_logprobs: list[list[float]] | None = None  # logprobs of params.candidate_token_ids, in their order
    stop_token_id: int | None = None  # the stop token id that ended the sample, if one did

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error"); the other requests go on
    # params.prompt_logprobs: each prompt token's logprob given its prefix (None for the first token), and the
    # k most likely {id: logprob} at each prompt position, best first (None for the first). Filled once the
    # whole prompt is computed, so the first output that carries a token has them whole.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


class RequestError(RuntimeError):
    """A request failed in the engine (its own fault or a failed step); raised to that request's consumer."""


class EngineStopped(RequestError):
    """The engine was shut down (or told to end every request) while the request was running."""
