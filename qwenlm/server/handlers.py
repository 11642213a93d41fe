"""/v1/chat/completions and /v1/completions: non-stream bodies and SSE streams in OpenAI's shape."""

from __future__ import annotations

import json
import logging

from qwenlm.sampling import check_in_vocab
from qwenlm.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, \
    TokenizeRequest, new_id, now, usage
from qwenlm.server.serving import EngineRun, ServerState, build_chat, merge_runs, sampling_params
from qwenlm.tools import ParsedReply, ReactStreamParser, parse_react_reply, reply_prefix


log = logging.getLogger("qwenlm.server")
DONE = "data: [DONE]\n\n"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def ended_properly(events):
    """The SSE events of `events` (which end with [DONE]); a failure after the headers went out ends the
    stream with an OpenAI-style error event and [DONE] instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        if not isinstance(e, ApiError):
            log.exception("stream failed")
            e = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        yield sse(e.body())
        yield DONE
    finally:  # also when the client left: the inner generator's `finally` aborts the engine request now
        await events.aclose()


def _token_text(tok, token_id: int) -> tuple[str, list[int]]:
    raw = tok.token_bytes[token_id]
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for tid, lp in zip(token_ids, logprobs):
        text, raw = _token_text(tok, tid)
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []})
    return {"content": content}


def completion_logprobs(tok, token_ids: list[int], logprobs: list[float] | None, offset: int) -> dict | None:
    if logprobs is None:
        return None
    tokens, offsets = [], []
    for tid in token_ids:
        offsets.append(offset)
        text, _ = _token_text(tok, tid)
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": list(logprobs[:len(token_ids)]), "top_logprobs": None,
            "text_offset": offsets}


def _call_fields(parsed: ParsedReply, style: str) -> tuple[dict, str]:
    """A parsed ReAct call -> message fields and finish_reason in the request's style (tools or functions)."""
    call = {"name": parsed.name, "arguments": parsed.arguments or ""}
    if style == "functions":
        return {"function_call": call}, "function_call"
    return {"tool_calls": [{"id": new_id("call"), "type": "function", "function": call}]}, "tool_calls"


def react_message(text: str, style: str, finish_reason: str) -> tuple[dict, str]:
    """A whole ReAct reply -> the assistant message and finish_reason (non-stream)."""
    parsed = parse_react_reply(text)
    message = {"role": "assistant", "content": parsed.content}
    if parsed.name:
        fields, finish_reason = _call_fields(parsed, style)
        message.update(fields)
    return message, finish_reason


def react_final_deltas(parsed: ParsedReply, style: str, finish_reason: str) -> tuple[list[dict], str]:
    """The end of a streamed ReAct reply -> the deltas still to send and the finish_reason."""
    deltas = [{"content": parsed.content}] if parsed.content else []
    if parsed.name:
        fields, finish_reason = _call_fields(parsed, style)
        if style == "tools":
            fields["tool_calls"][0]["index"] = 0
        deltas.append(fields)
    return deltas, finish_reason


def prepare_chat(state: ServerState, req: ChatCompletionRequest):
    if req.top_logprobs:
        raise ApiError(400, "top_logprobs > 0 is not supported (only the chosen token's logprob)",
                       param="top_logprobs")
    prompt_ids, functions, style = build_chat(state, req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(state, req, len(prompt_ids), with_tools=bool(functions), max_tokens=max_tokens,
                             logprobs=req.logprobs)
    return prompt_ids, params, (style if functions else None)


async def chat_full(state: ServerState, req: ChatCompletionRequest) -> dict:
    prompt_ids, params, style = prepare_chat(state, req)
    run = EngineRun(state, prompt_ids, params)
    final = None
    try:
        async for out in run.stream():
            final = out
    finally:
        run.close()
    choices, completion_tokens = [], 0
    for c in sorted(final.outputs, key=lambda c: c.index):
        completion_tokens += len(c.token_ids)
        message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
        if style:
            message, finish = react_message(c.text, style, finish)
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(state.tokenizer, c.token_ids, c.logprobs), "finish_reason": finish})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": usage(len(prompt_ids), completion_tokens)}


def chat_stream(state: ServerState, req: ChatCompletionRequest):
    """Validate and admit now (errors become HTTP statuses), then return the SSE body generator."""
    prompt_ids, params, style = prepare_chat(state, req)
    run = EngineRun(state, prompt_ids, params)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": state.model_name}

    def chunk(index, delta, finish=None, logprobs=None, tokens=0):
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = usage(len(prompt_ids), tokens) if continuous else None
        return sse(body)

    async def body():
        parsers = {i: ReactStreamParser(reply_prefix(req.messages)) for i in range(params.n)} if style else {}
        sent_tokens = [0] * params.n
        finished = set()  # choices whose finish_reason went out (later outputs still list them)
        total = 0
        try:
            for i in range(params.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for out in run.stream():
                total = sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    i = c.index
                    if i in finished:
                        continue
                    new_ids = c.token_ids[sent_tokens[i]:]
                    lps = chat_logprobs(state.tokenizer, new_ids,
                                        None if c.logprobs is None else c.logprobs[sent_tokens[i]:])
                    sent_tokens[i] = len(c.token_ids)
                    text = parsers[i].feed(c.text_delta) if style else c.text_delta
                    if text or lps and lps["content"]:
                        yield chunk(i, {"content": text}, logprobs=lps, tokens=total)
                    if c.finish_reason is not None:
                        finished.add(i)
                        finish = c.finish_reason
                        if style:
                            deltas, finish = react_final_deltas(parsers[i].finish(), style, finish)
                            for delta in deltas:
                                yield chunk(i, delta, tokens=total)
                        yield chunk(i, {}, finish=finish, tokens=total)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), total)})
            yield DONE
        finally:
            run.close()

    return ended_properly(body())


def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt. Text is raw text with special tokens: "<|im_start|>" typed in is the control
    token, as OpenAI-style servers and the official Qwen server encode a completion prompt (chat message
    content, by contrast, is always plain text)."""
    p = req.prompt
    if isinstance(p, str):
        prompts = [state.tokenizer.encode(p, allowed_special="all")]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [state.tokenizer.encode(x, allowed_special="all") for x in p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ApiError(400, "prompt must not be empty", param="prompt")
    for x in prompts:
        check_in_vocab("prompt", x, state.tokenizer.n_vocab)
    return prompts


def prepare_completion(state: ServerState, req: CompletionRequest):
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise ApiError(400, "best_of is not supported (use n)", param="best_of")
    prompts = _completion_prompts(state, req)
    state.admit(len(prompts), req.n)
    max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else None  # else the capped default
    params = [sampling_params(state, req, len(p), max_tokens=max_tokens, logprobs=req.logprobs is not None,
                              default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, prompt_param="prompt")
              for p in prompts]
    runs = []
    try:
        for p, sp in zip(prompts, params):
            runs.append(EngineRun(state, p, sp))
    except BaseException:
        for run in runs:
            run.close()
        raise
    echoes = [state.tokenizer.decode(p) if req.echo else "" for p in prompts]
    return prompts, runs, echoes


async def completion_full(state: ServerState, req: CompletionRequest) -> dict:
    prompts, runs, echoes = prepare_completion(state, req)
    finals = {}
    async for k, out in merge_runs(runs):
        finals[k] = out
    choices, completion_tokens = [], 0
    for k, out in sorted(finals.items()):
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append({"index": k * req.n + c.index, "text": echoes[k] + c.text, "finish_reason": c.finish_reason,
                            "logprobs": completion_logprobs(state.tokenizer, c.token_ids, c.logprobs, len(echoes[k]))})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": usage(sum(map(len, prompts)), completion_tokens)}


def completion_stream(state: ServerState, req: CompletionRequest):
    prompts, runs, echoes = prepare_completion(state, req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name}

    async def body():
        sent = {}  # (k, i) -> tokens sent
        finished = set()  # (k, i) whose finish_reason went out (later outputs still list them)
        totals = [0] * len(runs)
        try:
            async for k, out in merge_runs(runs):
                totals[k] = sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    key = (k, c.index)
                    if key in finished:
                        continue
                    if c.finish_reason is not None:
                        finished.add(key)
                    text = c.text_delta
                    offset = 0
                    if key not in sent:
                        sent[key] = 0
                        text = echoes[k] + text
                        offset = len(echoes[k])
                    new_ids = c.token_ids[sent[key]:]
                    lps = None if c.logprobs is None else completion_logprobs(
                        state.tokenizer, new_ids, c.logprobs[sent[key]:], offset)
                    sent[key] = len(c.token_ids)
                    if text or new_ids or c.finish_reason:
                        choice = {"index": k * req.n + c.index, "text": text, "logprobs": lps,
                                  "finish_reason": c.finish_reason}
                        yield sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(sum(map(len, prompts)), sum(totals))})
            yield DONE
        finally:
            for run in runs:
                run.close()

    return ended_properly(body())


def tokenize(state: ServerState, req: TokenizeRequest) -> dict:
    """The ids a completion (`prompt`) or chat completion (`messages`) request would give the model: the same
    encoding, so clients (lm-eval among them) can count and align tokens with the server's."""
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give either prompt or messages", param="prompt")
    if req.prompt is not None:
        ids = _completion_prompts(state, CompletionRequest(prompt=req.prompt))[0]
    else:
        ids = build_chat(state, ChatCompletionRequest(messages=req.messages, tools=req.tools))[0]
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


def detokenize(state: ServerState, req: DetokenizeRequest) -> dict:
    check_in_vocab("tokens", req.tokens, state.tokenizer.n_vocab)
    return {"prompt": state.tokenizer.decode(req.tokens)}
