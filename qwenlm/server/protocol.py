"""Request models of the OpenAI-compatible API, the OpenAI error shape, and response ids.

Fields follow OpenAI's order and names; the sampling extras (top_k, repetition_penalty, ignore_eos,
stop_token_ids, skip_special_tokens) are vLLM's, and `max_length` is the official Qwen server's.
Types are strict: a string where a number belongs is a 400, not a silent conversion. The values of the
sampling fields are checked by the rules every way into qwenlm shares (qwenlm.sampling), so they are the
same here as in the Python API; the limits written below are this API's own (as OpenAI's).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from qwenlm.sampling import ParamError, check_param

MAX_N = 16
MAX_STOP = 16


class ApiError(Exception):
    """An error returned to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


def _shared_rule(name: str, value, rule: str | None = None):
    """The value checked by qwenlm.sampling's rule (a 400 naming the field otherwise), returned as given."""
    if value is not None:
        try:
            check_param(name, value, rule)
        except ParamError as e:
            raise PydanticCustomError("param_error", "{message}", {"message": str(e)}) from None
    return value


class SamplingFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, le=2)
    top_p: float | None = None
    n: int = Field(1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    repetition_penalty: float | None = Field(None, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # the official Qwen server's: total length (prompt + reply), as transformers' generate counts it
    max_length: int | None = Field(None, ge=1)

    @field_validator("temperature", "top_p", "n", "stop", "seed", "top_k", "repetition_penalty", "stop_token_ids")
    @classmethod
    def _sampling_rules(cls, value, info: ValidationInfo):
        return _shared_rule(info.field_name, value)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_rule(cls, value):
        return _shared_rule("max_tokens", value)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Union[Literal["none", "auto"], dict[str, Any], None] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens_rule(cls, value):
        return _shared_rule("max_completion_tokens", value, rule="max_tokens")


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_rule(cls, value):
        # 0 with echo: score the prompt only (vLLM's echo without generation; checked in the handler)
        return value if value == 0 else _shared_rule("max_tokens", value)


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's route): a completion `prompt`, or chat `messages` (and `tools`) -> their ids."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def validation_error(exc) -> ApiError:
    """A pydantic ValidationError -> 400 naming the first bad field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = loc[0] if loc else None
    return ApiError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}", param=param)
