"""What the engine hands back per request; the contract between the engine and its callers (chat, server)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)  # all generated ids so far (stop tokens excluded)
    text: str = ""  # all text so far, stop strings cut, never a broken UTF-8 character
    text_delta: str = ""  # text added by this step
    logprobs: list[float] | None = None  # logprob of each chosen token, when asked for
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"

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


class RequestError(RuntimeError):
    """A request failed in the engine (its own fault or a failed step); raised to that request's consumer."""


class EngineStopped(RequestError):
    """The engine was shut down (or told to end every request) while the request was running."""
