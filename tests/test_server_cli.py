"""`qwenlm serve` as users run it: a separate process, the key from QWENLM_API_KEY, the official client."""

import os
import subprocess
import sys
import time

import httpx
import openai

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
