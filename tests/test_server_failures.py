"""Failures through the server: a request that breaks mid-generation fails alone (500, or an error event and
[DONE] on a stream) while the request beside it in the same steps finishes normally; stopping the server
ends open streams with a final error event and [DONE] within the grace period, and in-flight non-streamed
requests with a 503."""

import asyncio
import json
import threading
import time

import httpx
import pytest

from engine_helpers import EXPLODE_SEED, break_text_handling
from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread

MODEL = "tiny"
# long enough to be still decoding when the bad one has failed, even on a fast idle machine (~4 steps)
GOOD = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 600, "temperature": 0,
        "ignore_eos": True}
BAD = {"messages": [{"role": "user", "content": "Break"}], "max_tokens": 24, "temperature": 0, "seed": EXPLODE_SEED}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = AsyncEngine(LLM(tiny_ckpt, device="cpu"))
    yield eng
    eng.shutdown()


def sse_events(text: str) -> list:
    return [e[len("data: "):] for e in text.split("\n\n") if e.strip()]


def streamed_text(events: list) -> str:
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e).get("choices"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_breaking_request_fails_alone(engine, monkeypatch, stream):
    app = create_app(engine, engine.engine.tokenizer, MODEL)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        alone = http.post("/v1/chat/completions", json=GOOD).json()["choices"][0]["message"]["content"]
        break_text_handling(monkeypatch, after=3)

        async def both():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                good = asyncio.ensure_future(client.post("/v1/chat/completions", json={**GOOD, "stream": stream}))
                deadline = time.monotonic() + 120
                while not engine.engine.requests:  # the good one is decoding when the bad one joins its steps
                    assert time.monotonic() < deadline, "the good request never reached the engine"
                    await asyncio.sleep(0.01)
                bad = await client.post("/v1/chat/completions", json={**BAD, "stream": stream})
                assert not good.done()  # it ran beside the bad one all along
                return await good, bad

        good, bad = asyncio.run(both())
    assert good.status_code == 200
    if stream:
        events = sse_events(good.text)
        assert events[-1] == "[DONE]" and streamed_text(events) == alone
        assert bad.status_code == 200  # the headers went out before the failure
        events = sse_events(bad.text)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
    else:
        assert good.json()["choices"][0]["message"]["content"] == alone
        assert bad.status_code == 500
        err = bad.json()["error"]
    assert err["type"] == "server_error" and "detokenizer broke" in err["message"]
    core = engine.engine
    assert not core.requests and core.blocks.num_free_blocks == core.blocks.num_blocks


def test_stopping_the_server_ends_streams_with_a_final_event(engine):
    app = create_app(engine, engine.engine.tokenizer, MODEL)
    long = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 5000, "ignore_eos": True}
    srv = ServerThread(app, grace=1.0).start()
    results = {}

    def stream():
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
                results["stream"] = "".join(r.iter_text())

    def full():
        results["full"] = httpx.post(srv.url + "/v1/chat/completions", json=long, timeout=60)

    clients = [threading.Thread(target=stream), threading.Thread(target=full)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while len(engine.engine.requests) < 2:
        assert time.monotonic() < deadline, "the two requests did not start"
        time.sleep(0.05)
    started = time.monotonic()
    srv.stop()
    for t in clients:
        t.join(30)
    assert time.monotonic() - started < 1.0 + 5.0 + 3.0  # grace + final events + margin for a loaded machine
    events = sse_events(results["stream"])
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    assert results["full"].status_code == 503
    assert results["full"].json()["error"]["code"] == "server_shutting_down"
    assert not srv.thread.is_alive()
