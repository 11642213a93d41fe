"""/v1/chat/completions and /v1/completions: non-stream bodies and SSE streams in OpenAI's shape."""

from __future__ import annotations

import dataclasses
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
    # ids past the tokenizer's table (the model's padded vocabulary rows) can rank among the alternatives: no text
    raw = tok.token_bytes[token_id] if token_id < len(tok.token_bytes) else b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok, token_ids: list[int], logprobs: list[float] | None,
                  tops: list[dict[int, float]] | None = None) -> dict | None:
    """OpenAI's chat `logprobs.content`: each generated token (a stop token is not part of the message)."""
    if logprobs is None:
        return None
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        text, raw = _token_text(tok, tid)
        alternatives = []
        for alt, alt_lp in (tops[i] if tops else {}).items():
            alt_text, alt_raw = _token_text(tok, alt)
            alternatives.append({"token": alt_text, "logprob": alt_lp, "bytes": alt_raw})
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}


def _top_texts(tok, top: dict[int, float] | None, token_id: int, logprob: float) -> dict[str, float]:
    """A legacy `top_logprobs` entry: {token text: logprob} of the alternatives, best first, and the token
    itself (OpenAI's legacy API and vLLM list the chosen token too)."""
    out = {}
    for alt, alt_lp in (top or {}).items():
        out.setdefault(_token_text(tok, alt)[0], alt_lp)
    out.setdefault(_token_text(tok, token_id)[0], logprob)
    return out


def completion_logprobs(tok, token_ids: list[int], logprobs: list[float | None] | None, offset: int,
                        tops: list | None = None) -> dict | None:
    """OpenAI's legacy `logprobs` {tokens, token_logprobs, top_logprobs, text_offset} of `token_ids` (a first
    prompt token has logprob None and no alternatives); offsets count characters of the choice's text from
    `offset`."""
    if logprobs is None:
        return None
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        text, _ = _token_text(tok, tid)
        tokens.append(text)
        token_lps.append(lp)
        top_lps.append(None if lp is None else _top_texts(tok, tops[i] if tops else None, tid, lp))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_lps, "text_offset": offsets}


def _generated(c, start: int = 0) -> tuple[list[int], list[float] | None, list | None]:
    """A choice's generated ids from `start` with their logprobs and alternatives; a stop token id that ended it
    is listed last (vLLM lists it too: lm-eval drops the last entry of an echoed prompt + 1 token)."""
    ids = c.token_ids[start:] + ([c.stop_token_id] if c.stop_token_id is not None else [])
    if c.logprobs is None:
        return ids, None, None
    return ids, c.logprobs[start:], None if c.top_logprobs is None else c.top_logprobs[start:]


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
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt_ids, functions, style = build_chat(state, req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(state, req, len(prompt_ids), with_tools=bool(functions), max_tokens=max_tokens,
                             logprobs=req.logprobs)
    params = dataclasses.replace(params, top_logprobs=req.top_logprobs or 0)
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
                        "logprobs": chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, c.top_logprobs),
                        "finish_reason": finish})
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
                                        None if c.logprobs is None else c.logprobs[sent_tokens[i]:],
                                        None if c.top_logprobs is None else c.top_logprobs[sent_tokens[i]:])
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
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens 0 needs echo: true (the prompt alone is scored)", param="max_tokens")
    prompts = _completion_prompts(state, req)
    state.admit(len(prompts), req.n)
    max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else None  # else the capped default
    if max_tokens == 0:  # as vLLM: one token is computed and left out of the reply
        max_tokens = 1
    # logprobs k: each token's logprob and its k most likely alternatives; with echo, the prompt's too
    logprobs = dict(top_logprobs=req.logprobs or 0,
                    prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
    params = [dataclasses.replace(sampling_params(state, req, len(p), max_tokens=max_tokens,
                                                  logprobs=req.logprobs is not None,
                                                  default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
                                                  prompt_param="prompt"), **logprobs)
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


def completion_choice_logprobs(state: ServerState, req: CompletionRequest, out, c, start: int, offset: int):
    """The legacy logprobs of a choice's generated tokens from `start` on (their text from character `offset`),
    led by the prompt's (from character 0) in the choice's first piece when echo asks for them; generated
    tokens are left out for max_tokens 0."""
    if req.logprobs is None:
        return None
    tok = state.tokenizer
    ids, lps, tops = ([], [], None) if _echo_only(req) else _generated(c, start)
    body = completion_logprobs(tok, ids, lps, offset, tops)
    if req.echo and start == 0:
        head = completion_logprobs(tok, out.prompt_token_ids, out.prompt_logprobs, 0, out.prompt_top_logprobs)
        body = {key: head[key] + body[key] for key in body}
    return body


def _echo_only(req: CompletionRequest) -> bool:
    return req.max_tokens == 0


async def completion_full(state: ServerState, req: CompletionRequest) -> dict:
    prompts, runs, echoes = prepare_completion(state, req)
    finals = {}
    async for k, out in merge_runs(runs):
        finals[k] = out
    choices, completion_tokens = [], 0
    for k, out in sorted(finals.items()):
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += 0 if _echo_only(req) else len(c.token_ids)
            choices.append({"index": k * req.n + c.index, "text": echoes[k] + ("" if _echo_only(req) else c.text),
                            "finish_reason": c.finish_reason,
                            "logprobs": completion_choice_logprobs(state, req, out, c, 0, len(echoes[k]))})
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
                    text = "" if _echo_only(req) else c.text_delta
                    offset = 0  # text offsets are within each chunk's text
                    if key not in sent:
                        sent[key] = 0
                        text = echoes[k] + text
                        offset = len(echoes[k])
                    new_ids = c.token_ids[sent[key]:]
                    lps = completion_choice_logprobs(state, req, out, c, sent[key], offset)
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


def tokenizer_info(state: ServerState) -> dict:
    """`GET /tokenizer_info` (vLLM's route; lm-eval's remote tokenizer reads the special tokens from it).
    Qwen has no BOS token; <|endoftext|> is generation_config.json's eos_token_id and pad_token_id (spec §12.3)."""
    eos = state.tokenizer.decode([state.tokenizer.eod_id], skip_special_tokens=False)
    return {"tokenizer_class": "QWenTokenizer", "eos_token": eos, "bos_token": None, "pad_token": eos,
            "model_max_length": state.max_model_len}
