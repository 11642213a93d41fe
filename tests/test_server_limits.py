"""Limits a client can rely on: the true context (what the KV pool holds), the default max_tokens capped
to the room left, replies reaching the context end with "length", a request that could never be admitted
is a 400 (a full queue a 429), one finish_reason per choice in streams, completion prompts parse special
tokens."""

import json

import httpx
import pytest

from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from server_helpers import RecordingEngine

MODEL = "tiny"
CONTEXT = 8192  # the CPU pool: 512 blocks x 16 tokens (the checkpoint allows 32768)


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    engine = RecordingEngine(AsyncEngine(LLM(tiny_ckpt, device="cpu")))
    app = create_app(engine, engine.engine.tokenizer, MODEL)
    with ServerThread(app) as srv:
        srv.engine, srv.tok = engine, engine.engine.tokenizer
        srv.http = httpx.Client(base_url=srv.url, timeout=120)
        yield srv
    engine.inner.shutdown()


def events(text: str) -> list:
    data = [e[len("data: "):] for e in text.split("\n\n") if e.strip()]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_models_report_the_true_context(served):
    assert served.http.get("/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    assert served.http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == CONTEXT


@pytest.mark.parametrize("stream", [False, True])
def test_default_max_tokens_is_capped_and_the_reply_ends_with_length(served, stream):
    prompt = [5] * (CONTEXT - 3)  # room for 3 tokens; the default (16) does not fit
    r = served.http.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "ignore_eos": True,
                                                  "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = events(r.text)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    else:
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 3
    assert served.engine.calls[-1][1].max_tokens == 3
    assert len(served.engine.calls[-1][2].outputs[0].token_ids) == 3


def test_explicit_max_tokens_past_the_context_is_a_400_with_the_numbers(served):
    r = served.http.post("/v1/completions", json={"prompt": [5] * 8000, "max_tokens": 500})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "8192" in err["message"] and "8500" in err["message"]
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 8180})
    assert r.status_code == 400 and "8200" in r.json()["error"]["message"]


def stops_a_third_of_tokens(tok) -> list[int]:
    return list(range(0, tok.eod_id, 3))


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_each_choice_finishes_once_in_a_stream(served, route):
    body = {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 12, "stop_token_ids": stops_a_third_of_tokens(
        served.tok)}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"})
    served.http.post(route, json=body)
    lengths = [len(o.token_ids) for o in served.engine.calls[-1][2].outputs]
    assert len(set(lengths)) > 1  # the choices finish at different steps
    chunks = events(served.http.post(route, json={**body, "stream": True}).text)
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    assert [len(o.token_ids) for o in served.engine.calls[-1][2].outputs] == lengths


def test_completion_prompt_text_parses_special_tokens(served):
    tok = served.tok
    served.http.post("/v1/completions", json={"prompt": "<|im_start|>user\nhi<|im_end|>\n", "max_tokens": 1})
    assert served.engine.calls[-1][0] == [tok.im_start_id, *tok.encode("user\nhi"), tok.im_end_id, *tok.encode("\n")]
    served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "<|im_end|>"}],
                                                    "max_tokens": 1})
    assert served.engine.calls[-1][0].count(tok.im_end_id) == 2  # chat content stays plain text


def test_a_request_that_can_never_be_admitted_is_400_a_full_queue_429(served):
    engine = served.engine
    app = create_app(engine, served.tok, MODEL, max_pending=3, max_request_seqs=8)
    long = {"prompt": "go", "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": ["a"] * 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "3 prompts" in r.text
        r = http.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 3})
        assert r.status_code == 400 and "at most 8 sequences" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        with http.stream("POST", "/v1/completions", json={**long, "prompt": ["go", "on"]}) as running:
            assert running.status_code == 200
            r = http.post("/v1/completions", json={"prompt": ["a", "b"]})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
