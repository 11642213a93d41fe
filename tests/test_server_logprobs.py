"""Logprobs through the OpenAI-compatible server on the tiny checkpoint (a real uvicorn server and the real
engine): `/v1/completions` with echo + logprobs k (+ max_tokens 0 or 1) in OpenAI's legacy shape, as lm-eval and
OpenCompass read it, and chat `top_logprobs`. Numbers are checked against one direct forward of the network
(log_softmax at each position), token texts against the tokenizer's byte table."""

import json

import httpx
import openai
import pytest
import torch

from engine_helpers import LOGPROB_ATOL, direct_log_softmax
from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from server_helpers import RecordingEngine

KEY = "test-key"
MODEL = "Qwen-tiny-Chat"
TEXT = "The capital of France is Paris. 巴黎是法国的首都。"


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    engine = RecordingEngine(AsyncEngine(LLM(tiny_ckpt, device="cpu")))
    tok = engine.engine.tokenizer
    with ServerThread(create_app(engine, tok, MODEL, api_key=KEY)) as srv:
        srv.engine, srv.tok, srv.model = engine, tok, engine.engine.model
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        srv.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield srv
    engine.inner.shutdown()


def text_of(tok, i: int) -> str:
    return tok.token_bytes[i].decode("utf-8", errors="replace")


def check_legacy(tok, lp: dict, ids: list[int], lsm: torch.Tensor, k: int) -> None:
    """Legacy logprobs of the token ids `ids` (a prompt from its first token) against lsm [len(ids), V], the
    direct log_softmax over them: entry i is token i given tokens < i."""
    assert lp["tokens"] == [text_of(tok, i) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = lsm[:len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, rtol=0, atol=LOGPROB_ATOL)
    top = torch.topk(lsm[:len(ids) - 1], k, dim=1)
    for p, entry in enumerate(lp["top_logprobs"][1:]):
        expected = {text_of(tok, i): v for i, v in zip(top.indices[p].tolist(), top.values[p].tolist())}
        expected.setdefault(text_of(tok, ids[p + 1]), want[p].item())  # the token itself is always listed
        assert list(entry) == list(expected)
        assert list(entry.values()) == pytest.approx(list(expected.values()), abs=LOGPROB_ATOL)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_echo_with_max_tokens_0_scores_the_prompt(served):
    tok = served.tok
    ids = tok.encode(TEXT)
    r = served.http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 3,
                                                  "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    check_legacy(tok, choice["logprobs"], ids, direct_log_softmax(served.model, ids), 3)
    params = served.engine.calls[-1][1]
    assert (params.prompt_logprobs, params.top_logprobs, params.max_tokens) == (3, 3, 1)


def test_echo_with_max_tokens_1_adds_the_generated_token_last_as_lm_eval_reads_it(served):
    tok = served.tok
    prompts = ["Question: 1+1?\nAnswer:", "Hello"]
    r = served.client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                         temperature=0)
    for prompt, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index)):
        ids = tok.encode(prompt)
        lp = choice.logprobs
        out = next(call[2] for call in served.engine.calls if call[0] == ids)
        gen = out.outputs[0].token_ids + ([out.outputs[0].stop_token_id] if out.outputs[0].stop_token_id else [])
        assert len(gen) == 1 and len(lp.tokens) == len(ids) + 1
        lsm = direct_log_softmax(served.model, ids + gen, len(ids))
        check_legacy(tok, {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "top_logprobs": lp.top_logprobs,
                           "text_offset": lp.text_offset}, ids + gen, lsm, 1)
        # greedy: the generated token is the top-1, the very number lm-eval compares for is_greedy
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
        assert choice.text == prompt + out.outputs[0].text


def test_a_stop_token_that_ends_the_reply_is_listed_last(served):
    tok = served.tok
    ids = tok.encode("Hello")
    first = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    stop = served.engine.calls[-1][2].outputs[0].token_ids[0]
    r = served.http.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 1,
                                                  "temperature": 0, "stop_token_ids": [stop]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "Hello" and first.choices[0].text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == text_of(tok, stop)
    assert list(lp["top_logprobs"][-1]) == [text_of(tok, stop)]  # logprobs 0: the token itself only


def test_stream_echo_sends_the_prompt_logprobs_in_the_first_chunk(served):
    tok = served.tok
    ids = tok.encode(TEXT)
    body = {"prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "stream": True,
            "ignore_eos": True}
    events = [json.loads(line[6:]) for line in served.http.post("/v1/completions", json=body).text.splitlines()
              if line.startswith("data: {")]
    full = served.http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    lps = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert tokens == full["logprobs"]["tokens"] and len(tokens) == len(ids) + 3
    assert lps[0] is None and lps[1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:], abs=LOGPROB_ATOL)
    assert len(events[0]["choices"][0]["logprobs"]["tokens"]) >= len(ids)


def test_chat_top_logprobs(served):
    tok = served.tok
    r = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}],
                                              temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    prompt, params, out = served.engine.calls[-1]
    gen = out.outputs[0].token_ids
    lsm = direct_log_softmax(served.model, prompt + gen, len(prompt))[len(prompt) - 1:]
    content = r.choices[0].logprobs.content
    assert len(content) == len(gen) and params.top_logprobs == 3
    for p, entry in enumerate(content):
        top = torch.topk(lsm[p], 3)
        assert [t.token for t in entry.top_logprobs] == [text_of(tok, i) for i in top.indices.tolist()]
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tok.token_bytes[i] for i in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=LOGPROB_ATOL)
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the first
    s = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}],
                                              temperature=0, max_tokens=4, logprobs=True, top_logprobs=3,
                                              stream=True)
    streamed = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs]
                                                                     for e in content]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
])
def test_bad_logprob_requests_are_400_naming_the_field(served, path, body, param):
    r = served.http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_tokenizer_info_as_lm_eval_reads_it(served):
    info = served.http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None
    ids = served.http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert ids["tokens"] == [served.tok.eod_id]
