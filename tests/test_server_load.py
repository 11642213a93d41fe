"""Concurrency: 64 streaming clients (some leave early), disconnects free KV blocks, 429 when full, and
/metrics adds up — with the engine in a thread of the server's process and in a process of its own."""

import asyncio
import json
import re
import time

import httpx
import pytest

from qwenlm.engine import LLM, AsyncEngine
from qwenlm.engine.core import CheckpointFactory, CoreSpec
from qwenlm.engine.core_client import EngineClient
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from qwenlm.tokenizer import Tokenizer

MODEL = "tiny"


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def engine(tiny_ckpt, request):
    """The same app around either engine: a thread of this process, or `qwenlm serve`'s engine process."""
    if request.param == "in-process":
        eng = AsyncEngine(LLM(tiny_ckpt, device="cpu"))
    else:
        eng = EngineClient(CoreSpec(CheckpointFactory(str(tiny_ckpt), "cpu")), Tokenizer.from_folder(tiny_ckpt))
    eng.tok = Tokenizer.from_folder(tiny_ckpt)
    yield eng
    eng.shutdown()


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf'^{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_idle(engine, timeout=60.0):  # generous for a loaded machine; an idle engine returns at once
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["num_requests"] and stats["num_free_blocks"] == stats["num_blocks"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {stats['num_requests']} requests, "
                         f"{stats['num_free_blocks']}/{stats['num_blocks']} blocks free")


def test_64_concurrent_streams_with_early_disconnects(engine):
    app = create_app(engine, engine.tok, MODEL)
    with ServerThread(app) as srv:
        before = httpx.get(srv.url + "/metrics").text

        async def client(i: int, leave_early: bool):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Question number {i}"}],
                    "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0}
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    events = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if leave_early and len(events) >= 2:
                                return None  # closes the connection mid-stream
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 1
            return {**chunks[-1]["usage"], "i": i}

        async def main():
            jobs = [client(i, leave_early=(i % 4 == 0)) for i in range(64)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=300)

        usages = asyncio.run(main())
        wait_idle(engine)  # every request finished or aborted; every KV block back in the free pool
        completed = [u for u in usages if u is not None]
        assert len(completed) == 48
        after = httpx.get(srv.url + "/metrics").text

    def delta(name, labels=""):
        return metric(after, name, labels) - metric(before, name, labels)

    assert delta("qwenlm:e2e_request_latency_seconds_count") == 64
    assert delta("qwenlm:request_success_total", 'finished_reason="abort"') == 16
    assert delta("qwenlm:request_success_total", 'finished_reason="length"') + delta(
        "qwenlm:request_success_total", 'finished_reason="stop"') == 48
    base = completed[0]["prompt_tokens"] - len(str(completed[0]["i"]))  # one token per digit (spec §11.2)
    assert all(u["prompt_tokens"] == base + len(str(u["i"])) for u in completed)
    assert delta("qwenlm:prompt_tokens_total") == sum(base + len(str(i)) for i in range(64))
    generated = delta("qwenlm:generation_tokens_total")
    assert sum(u["completion_tokens"] for u in completed) <= generated <= sum(
        u["completion_tokens"] for u in completed) + 16 * 16
    assert delta("qwenlm:time_to_first_token_seconds_count") == 64
    assert metric(after, "qwenlm:num_requests_running") == 0 and metric(after, "qwenlm:kv_cache_usage_perc") == 0


def test_disconnect_aborts_non_stream_and_stream(engine):
    app = create_app(engine, engine.tok, MODEL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 5000,
            "ignore_eos": True}
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                next(r.iter_lines())
        wait_idle(engine)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=1.0)
        wait_idle(engine)
        assert metric(httpx.get(srv.url + "/metrics").text, "qwenlm:request_success_total",
                      'finished_reason="abort"') == 2


def test_full_server_answers_429(engine):
    app = create_app(engine, engine.tok, MODEL, max_pending=2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 5000, "ignore_eos": True,
            "stream": True}
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as a, httpx.Client(base_url=srv.url, timeout=60) as b:
            with a.stream("POST", "/v1/chat/completions", json=body) as r1, \
                    b.stream("POST", "/v1/chat/completions", json=body) as r2:
                assert r1.status_code == r2.status_code == 200
                r = httpx.post(srv.url + "/v1/chat/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
                r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
                assert r.status_code == 429
        wait_idle(engine)
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200  # admitted again once the others left
