"""`qwenlm serve` as users run it: a separate process, the key from QWENLM_API_KEY, the official client,
SIGTERM during a stream, an empty key."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from qwenlm.server.launch import free_port


def test_qwenlm_serve_process(tiny_ckpt):
    port = free_port()
    env = {**os.environ, "QWENLM_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "qwenlm.cli", "serve", "--model", str(tiny_ckpt), "--device", "cpu",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # imports and model load, slow on a loaded machine
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "qwenlm serve did not come up in 180 s"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        model = client.models.list().data[0].id
        assert model == tiny_ckpt.name
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.prompt_tokens == 20 and 1 <= r.usage.completion_tokens <= 4
        assert "text/html" in httpx.get(url + "/", auth=("", "env-key")).headers["content-type"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None


def start_serve(tiny_ckpt, *extra, env=None, **popen):
    port = free_port()
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "qwenlm.cli", "serve", "--model", str(tiny_ckpt), "--device", "cpu",
                             "--port", str(port), *extra], env=env or os.environ.copy(), **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (proc.stdout or proc.stderr).read().decode()
        assert time.monotonic() < deadline, "qwenlm serve did not come up in 60 s"
        time.sleep(0.2)


def test_sigterm_ends_open_streams_with_a_final_event_then_exits(tiny_ckpt):
    proc, url = start_serve(tiny_ckpt, "--timeout-graceful-shutdown", "1")
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 5000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        assert time.monotonic() - started < 1 + 5 + 5  # grace + final events + margin for a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_empty_api_key_is_an_error(tiny_ckpt, how):
    env = {**os.environ, "QWENLM_API_KEY": ""} if how == "environment" else os.environ.copy()
    args = ["--api-key", ""] if how == "option" else []
    r = subprocess.run([sys.executable, "-m", "qwenlm.cli", "serve", "--model", str(tiny_ckpt), "--device", "cpu",
                        "--port", str(free_port()), *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "empty" in r.stderr
