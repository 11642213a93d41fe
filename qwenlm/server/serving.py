"""Turning validated requests into engine requests: prompts, sampling, limits, and engine-run bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from qwenlm.config import GenerationConfig
from qwenlm.engine.core_client import EngineDead
from qwenlm.engine.outputs import EngineStopped, RequestError
from qwenlm.sampling import SamplingParams, check_in_vocab
from qwenlm.server.metrics import RequestTimer, ServerMetrics
from qwenlm.server.protocol import ApiError, ChatCompletionRequest, SamplingFields, new_id
from qwenlm.tools import OBSERVATION_STOP, ChatTurns, MessagesError, functions_from_tools, function_name, \
    messages_to_turns, turns_prompt_ids


MAX_REQUEST_SEQS = 256  # sequences (prompts x n) one request may create


@dataclass
class ServerState:
    engine: object
    tokenizer: object
    model_name: str
    generation_config: GenerationConfig
    max_model_len: int  # prompt + reply tokens of one sequence (the engine's true context)
    max_pending: int  # engine requests admitted at once (running + queued); more get 429
    max_request_seqs: int  # sequences one request may create (prompts x n); more is a 400
    metrics: ServerMetrics
    pending: int = 0

    def admit(self, num_requests: int, n: int) -> None:
        """400 for a request that could never be admitted, 429 while the queue is too full for it now, 503
        once the engine is gone."""
        failure = getattr(self.engine, "failure", None)
        if failure is not None:
            raise ApiError(503, f"The engine is not running: {failure}. The server must be restarted.",
                           type="server_error", code="engine_unavailable")
        if num_requests > self.max_pending or num_requests * n > self.max_request_seqs:
            raise ApiError(400, f"The request asks for {num_requests} prompt(s) x n={n} = {num_requests * n} "
                                f"sequences; a request may create at most {self.max_request_seqs} sequences and "
                                f"{self.max_pending} prompts.", param="prompt" if num_requests > 1 else "n")
        if self.pending + num_requests > self.max_pending:
            raise ApiError(429, f"The server is busy: {self.pending} requests are running or queued (limit "
                                f"{self.max_pending}). Retry later.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded")

    def end_requests(self) -> None:
        """End every running request now (shutdown): streams get a final error event, others a 503."""
        stop_all = getattr(self.engine, "stop_all", None)
        if stop_all is not None:
            stop_all("the server is shutting down")


def chat_functions(req: ChatCompletionRequest) -> tuple[list[dict], str | None]:
    """The functions to put in the ReAct prompt, and "tools" / "functions" for how to answer a call."""
    try:
        functions = functions_from_tools(req.tools, req.functions)
    except MessagesError as e:
        raise ApiError(400, str(e), param=e.param) from None
    if not functions:
        if req.tool_choice not in (None, "none", "auto") or isinstance(req.function_call, dict):
            raise ApiError(400, "tool_choice/function_call names a tool but no tools were given", param="tool_choice")
        return [], None
    style = "tools" if req.tools else "functions"
    choice = req.tool_choice if req.tools else req.function_call
    if choice == "none":
        return [], style
    if isinstance(choice, dict):  # named: only that function is offered (not enforced beyond the prompt)
        name = (choice.get("function") or {}).get("name") if req.tools else choice.get("name")
        chosen = [f for f in functions if function_name(f) == name]
        if not chosen:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the given tools",
                           param="tool_choice")
        functions = chosen
    return functions, style


def chat_prompt_ids(state: ServerState, turns: ChatTurns) -> list[int]:
    return turns_prompt_ids(state.tokenizer, turns, state.generation_config.max_window_size)


def build_chat(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], list[dict], str | None]:
    functions, style = chat_functions(req)
    try:
        turns = messages_to_turns(req.messages, functions)
    except MessagesError as e:
        raise ApiError(400, str(e), param=e.param) from None
    return chat_prompt_ids(state, turns), functions, style


def extra_stop_words(stops: list[str]) -> list[str]:
    """Each stop string and its variant without leading newlines (official `add_extra_stop_words`: a
    leading "\\n" is often merged into the previous token)."""
    out = []
    for s in stops:
        for v in (s, s.lstrip("\n")):
            if v and v not in out:
                out.append(v)
    return out


def sampling_params(state: ServerState, req: SamplingFields, prompt_len: int, with_tools: bool = False,
                    max_tokens: int | None = None, logprobs: bool = False, default_max_tokens: int | None = None,
                    prompt_param: str = "messages") -> SamplingParams:
    """SamplingParams for one prompt. max_tokens None: the default (`default_max_tokens`, else the checkpoint's
    max_new_tokens), capped to the room the context leaves; an explicit max_tokens past it is a 400."""
    gen = state.generation_config
    room = state.max_model_len - prompt_len
    if room <= 0:
        raise ApiError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, your "
                            f"prompt has {prompt_len} tokens. Please reduce the length of the messages or prompt.",
                       param=prompt_param, code="context_length_exceeded")
    if req.max_length is not None and max_tokens is None:
        max_tokens = req.max_length - prompt_len
        if max_tokens < 1:
            raise ApiError(400, f"max_length {req.max_length} leaves no room for a reply after the {prompt_len} "
                                "prompt tokens", param="max_length")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} "
                            "in the completion). Please reduce the length of the messages or completion.",
                       param="max_tokens", code="context_length_exceeded")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (use repetition_penalty)", param=name)
    stops = extra_stop_words(req.stop_list())
    if with_tools and OBSERVATION_STOP not in stops:
        stops.append(OBSERVATION_STOP)
    tok = state.tokenizer
    stop_ids = [tok.im_end_id, tok.im_start_id] + ([] if req.ignore_eos else [tok.eod_id])
    check_in_vocab("stop_token_ids", req.stop_token_ids or [], tok.n_vocab)
    stop_ids += req.stop_token_ids or []
    temperature = gen.temperature if req.temperature is None else req.temperature
    if not gen.do_sample and req.temperature is None:
        temperature = 0.0
    if temperature < 0.01:  # the official server's rule: such temperatures mean greedy
        temperature = 0.0
    if max_tokens is None:
        max_tokens = min(default_max_tokens or gen.max_new_tokens, room)
    try:
        return SamplingParams(
            temperature=temperature,
            top_p=gen.top_p if req.top_p is None else req.top_p,
            top_k=(gen.top_k or 0) if req.top_k is None else req.top_k,
            repetition_penalty=(gen.repetition_penalty or 1.0) if req.repetition_penalty is None
            else req.repetition_penalty,
            max_tokens=max_tokens, stop=stops, stop_token_ids=sorted(set(stop_ids)), seed=req.seed, n=req.n,
            logprobs=logprobs, ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:  # SamplingParams holds the range rules; its errors name the field
        raise ApiError(400, str(e), param=getattr(e, "field", None)) from None


def engine_error(e: RequestError) -> ApiError:
    """A request that failed in the engine, as the client sees it."""
    if isinstance(e, EngineDead):
        return ApiError(503, f"The request failed: {e}. The server must be restarted.", type="server_error",
                        code="engine_unavailable")
    if isinstance(e, EngineStopped):
        return ApiError(503, f"The request was ended: {e}. Retry later.", type="server_error",
                        code="server_shutting_down")
    return ApiError(500, f"The request failed: {e}", type="server_error")


def abort_request(engine, request_id: str) -> None:
    """Abort without awaiting (callable from a `finally` under cancellation): AsyncEngine.abort_nowait, or a
    plain `abort` of an engine that has no separate non-async form."""
    abort = getattr(engine, "abort_nowait", None) or engine.abort
    result = abort(request_id)
    if asyncio.iscoroutine(result):
        asyncio.ensure_future(result)


class EngineRun:
    """One engine request: validated by the engine and admitted (429 when full) before any work starts,
    metrics, abort when the caller stops early, and engine failures as ApiErrors.

    `close()` is synchronous so it can run in a `finally` under cancellation (client disconnects).
    """

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams):
        state.admit(1, params.n)
        self.request_id = new_id("req")
        try:
            self.request = state.engine.make_request(prompt_ids, params, self.request_id)
        except ValueError as e:
            raise ApiError(400, str(e), param=getattr(e, "field", None)) from None
        state.pending += 1
        self.state, self.prompt_ids, self.params = state, prompt_ids, params
        self.timer = RequestTimer(state.metrics, len(prompt_ids))
        self.finished = False
        self.closed = False
        self.reasons: list[str] = []

    async def stream(self):
        try:
            async with contextlib.aclosing(self.state.engine.stream(self.request)) as outs:
                async for out in outs:
                    self.timer.tokens(sum(len(c.token_ids) for c in out.outputs))
                    if out.finished:
                        self.finished = True
                        self.reasons = [c.finish_reason or "stop" for c in out.outputs]
                    yield out
        except RequestError as e:
            raise engine_error(e) from None
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            abort_request(self.state.engine, self.request_id)  # frees its KV blocks
            self.reasons = ["abort"]
        self.timer.done(self.reasons)
        self.state.pending -= 1


async def merge_runs(runs: list[EngineRun]):
    """Yield (run index, RequestOutput) from several runs as they come (completions with several prompts)."""
    if len(runs) == 1:
        async for out in runs[0].stream():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, run: EngineRun):
        try:
            async for out in run.stream():
                await queue.put((k, out, None))
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put((k, None, e))
            return
        await queue.put((k, None, None))

    tasks = [asyncio.create_task(pump(k, run)) for k, run in enumerate(runs)]
    try:
        done = 0
        while done < len(runs):
            k, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                done += 1
            else:
                yield k, out
    finally:
        for t in tasks:
            t.cancel()
        for run in runs:
            run.close()
