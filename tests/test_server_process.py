"""The server with its engine in a process of its own (engine/core.py behind core_client.EngineClient), checked
against the same app around the in-process AsyncEngine: the same replies and usage for mixed concurrent requests,
stop strings exact, a disconnect frees its blocks at once, and an engine process that dies fails its requests
with a 503, turns /health unhealthy and says so in the log."""

import asyncio
import functools
import json
import logging
import os
import signal
import time

import httpx
import pytest

from core_factories import scripted_tiny
from engine_helpers import LOGPROB_ATOL
from qwenlm.engine import LLM, AsyncEngine, SamplingParams
from qwenlm.engine.core import CheckpointFactory, CoreSpec
from qwenlm.engine.core_client import EngineClient, EngineStartError
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from qwenlm.tokenizer import Tokenizer
from test_server_load import metric, wait_idle

MODEL = "tiny"


@pytest.fixture(scope="module")
def split(tiny_ckpt):
    engine = EngineClient(CoreSpec(CheckpointFactory(str(tiny_ckpt), "cpu")), Tokenizer.from_folder(tiny_ckpt))
    with ServerThread(create_app(engine, engine.tokenizer, MODEL)) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()
    assert engine.process.returncode == 0  # it ended its loop, not killed


@pytest.fixture(scope="module")
def in_process(tiny_ckpt):
    engine = AsyncEngine(LLM(tiny_ckpt, device="cpu"))
    with ServerThread(create_app(engine, engine.engine.tokenizer, MODEL)) as srv:
        yield srv
    engine.shutdown()


def chat(content, **kw):
    return ("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "temperature": 0, **kw})


MIXED = [  # chat and completions, streamed and not, several lengths, n=2 seeded sampling, a stop string, ids
    chat("Hello", max_tokens=9),
    chat("Tell me a long story about a fox", max_tokens=40, ignore_eos=True, stream=True,
         stream_options={"include_usage": True}),
    chat("你好", max_tokens=17, n=2, temperature=0.8, seed=7),
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": [[1, 2, 3, 4, 5], [9, 8, 7]], "max_tokens": 6, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}}),
    chat("Count", max_tokens=30, ignore_eos=True, stop=["e"], logprobs=True),
    ("/v1/completions", {"prompt": "x" * 300, "max_tokens": 5, "temperature": 0, "echo": True}),
    chat("Bye", max_tokens=3, stream=True),
    # logprobs of every kind cross the process boundary: prompt logprobs with top-k (echo, max_tokens 0),
    # top-k of generated tokens (completions and chat), streamed and not
    ("/v1/completions", {"prompt": "Paris is the capital of", "max_tokens": 0, "echo": True, "logprobs": 3}),
    ("/v1/completions", {"prompt": "One two three", "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2,
                         "stream": True}),
    chat("Logprobs please", max_tokens=6, logprobs=True, top_logprobs=3),
]


def assert_close(got, want, where="reply"):
    """Equal structures, floats (logprobs) within LOGPROB_ATOL: the two servers batch the requests differently,
    which moves a logprob by float rounding (~1e-7)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=0, abs=LOGPROB_ATOL), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def summary(path, body, r: httpx.Response):
    """What must be the same on both servers: texts, finish reasons, logprobs, usage (ids and times differ)."""
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        data = r.json()
        return sorted((c["index"], c.get("text") or c["message"]["content"], c["finish_reason"],
                       c["logprobs"]) for c in data["choices"]), data["usage"]
    texts, reasons, use = {}, {}, None
    for event in r.text.split("\n\n"):
        if not event.startswith("data: ") or event == "data: [DONE]":
            continue
        chunk = json.loads(event[6:])
        use = chunk.get("usage") or use
        for c in chunk["choices"]:
            piece = c.get("text") if "text" in c else (c["delta"].get("content") or "")
            texts[c["index"]] = texts.get(c["index"], "") + piece
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return sorted((i, texts[i], reasons[i]) for i in texts), use


async def run_all(url, requests):
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        rs = await asyncio.gather(*[http.post(path, json=body) for path, body in requests])
    return [summary(path, body, r) for (path, body), r in zip(requests, rs)]


def test_same_replies_and_usage_as_the_in_process_engine(split, in_process):
    got = asyncio.run(run_all(split.url, MIXED))
    want = asyncio.run(run_all(in_process.url, MIXED))
    assert_close(got, want)
    assert any(reason == "stop" for s, _ in got for _, _, reason, *rest in s)  # the stop string cut a reply


def test_a_client_leaving_mid_stream_frees_its_blocks(split):
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=split.url, timeout=60) as http:
        before = metric(http.get("/metrics").text, "qwenlm:request_success_total", 'finished_reason="abort"')
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            deadline = time.monotonic() + 30
            while split.engine.stats()["num_free_blocks"] == split.engine.stats()["num_blocks"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert split.engine.stats()["num_requests"] == 1  # holding blocks, decoding
        wait_idle(split.engine, timeout=5.0)  # at once, not after 5000 tokens
        text = http.get("/metrics").text
    assert metric(text, "qwenlm:kv_cache_usage_perc") == 0 and metric(text, "qwenlm:num_requests_running") == 0
    assert metric(text, "qwenlm:request_success_total", 'finished_reason="abort"') == before + 1


REPLY = "The answer is 42. STOP and then more words."


def test_a_deterministic_engine_process_from_a_factory(tiny_ckpt):
    """A factory importable by name builds the core's model (here with a scripted lm_head): stop strings cut
    exactly through the process boundary."""
    engine = EngineClient(CoreSpec(functools.partial(scripted_tiny, str(tiny_ckpt), REPLY)),
                          Tokenizer.from_folder(tiny_ckpt))
    try:
        with ServerThread(create_app(engine, engine.tokenizer, MODEL)) as srv:
            got = asyncio.run(run_all(srv.url, [chat("q", max_tokens=50, stop=["STOP"], stream=True)]))
    finally:
        engine.shutdown()
    assert got[0][0] == [(0, "The answer is 42. ", "stop")]


LONG = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 5000, "ignore_eos": True}


async def kill_in_flight(url, engine, kill):
    """Two long requests running on `engine` (one streamed), then `kill()`: the non-streamed reply and the stream's
    data events."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        full = asyncio.ensure_future(http.post("/v1/chat/completions", json=LONG))
        async with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.aiter_lines()
            await lines.__anext__()
            while engine.stats()["num_requests"] < 2:
                await asyncio.sleep(0.01)
            kill()
            events = [line[6:] async for line in lines if line.startswith("data: ")]
        return await full, events


def test_a_dead_engine_process_fails_requests_with_503(tiny_ckpt, caplog):
    engine = EngineClient(CoreSpec(CheckpointFactory(str(tiny_ckpt), "cpu")), Tokenizer.from_folder(tiny_ckpt))
    try:
        with ServerThread(create_app(engine, engine.tokenizer, MODEL)) as srv:
            assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
            with caplog.at_level(logging.ERROR, logger="qwenlm.engine"):
                full, events = asyncio.run(asyncio.wait_for(
                    kill_in_flight(srv.url, engine, lambda: os.kill(engine.process.pid, signal.SIGKILL)), 60))
            assert full.status_code == 503
            assert full.json()["error"]["code"] == "engine_unavailable"
            assert "exited unexpectedly" in full.json()["error"]["message"]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 503 and "exit code -9" in health.json()["error"]
            r = httpx.post(srv.url + "/v1/chat/completions", json={**LONG, "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        engine.shutdown()
    assert any("exited unexpectedly" in rec.getMessage() for rec in caplog.records)


def test_an_engine_that_cannot_be_built_says_why(tmp_path):
    with pytest.raises(EngineStartError, match="config.json"):
        EngineClient(CoreSpec(CheckpointFactory(str(tmp_path), "cpu")))


def test_ids_outside_the_models_vocabulary_never_reach_the_engine(split):
    """The engine process's client checks prompt and candidate ids against the model's rows (Ready says how many):
    such an id would fail the step of every request in it (on a GPU, end the process)."""
    client, rows = split.engine, split.engine.vocab_size
    with pytest.raises(ValueError, match=rf"prompt\[1\] is {rows}, outside the vocabulary \(0..{rows - 1}\)"):
        client.make_request([5, rows, 7], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=rf"candidate_token_ids\[1\] is {rows + 3}, outside the vocabulary"):
        client.make_request([5], SamplingParams(max_tokens=2, candidate_token_ids=[4, rows + 3]))
    r = httpx.post(split.url + "/v1/completions", json={"prompt": [3, 4], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and httpx.get(split.url + "/health").json()["status"] == "ok"
