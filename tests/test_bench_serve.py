"""bench/bench_serve.py runs end to end at tiny shapes on the CPU (--tiny: `qwenlm serve` started as a user starts
it, the load generator, the offline engine run) and writes every figure it promises."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms")


def test_bench_serve_runs_tiny_and_writes_results(tmp_path):
    out = tmp_path / "bench_serve.json"
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--tiny", "--workdir", str(tmp_path / "work"),
                        "--json", str(out), "--only", "sweep,poisson,ttft,int4,offline"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "==== server / engine ====" in r.stdout
    res = json.loads(out.read_text())
    load = res["server"]["load"]
    assert set(load) == {"concurrency 1", "concurrency 4", "poisson 20.0/s"}
    sizes = res["sizes"]
    for name, run in load.items():
        want = max(int(name.split()[1]), sizes["min_requests"]) if name.startswith("concurrency") \
            else sizes["poisson_requests"]
        assert run["requests"] == want, name
        # every request streamed all its tokens (ignore_eos): the throughput counts what usage reports
        assert abs(run["output_tok_s"] * run["wall_s"] - want * sizes["new_tokens"]) < 1e-6 * want, name
        for key in LATENCIES:
            d = run[key]
            assert 0 < d["p50"] <= d["p99"] and d["mean"] > 0, (name, key)
    assert res["server"]["ttft_short_ms"] > 0 and res["server"]["b1_decode_tok_s"] > 0
    ratios = res["ratios"]
    assert {"4 x 32/8 output tok/s", "batch-1 decode tok/s", "batch-1 decode tok/s, GPTQ Int4",
            "TTFT short prompt (ms)", "TTFT long prompt (ms)"} == set(ratios)
    for k, v in ratios.items():
        assert v["server"] > 0 and v["engine"] > 0 and abs(v["ratio"] - v["server"] / v["engine"]) < 1e-9, k


def test_guidellms_tokenizer_is_qwens(tiny_ckpt, tmp_path):
    """guidellm counts its synthetic prompts' tokens with a Hugging Face tokenizer: the one bench_serve converts from
    qwen.tiktoken gives the official tokenizer's ids (tiktoken, through qwenlm.tokenizer), special tokens too."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_serve import hf_tokenizer
    from transformers import AutoTokenizer

    from qwenlm.tokenizer import Tokenizer
    hf = AutoTokenizer.from_pretrained(hf_tokenizer(str(tiny_ckpt), str(tmp_path)))
    qwen = Tokenizer.from_folder(tiny_ckpt)
    for text in ["Hello world! 你好，世界。", "  def f(x):\n\treturn x**2  # 1234567", "Ünïcödé 🤖\r\n\n  end",
                 "cafe\u0301 (NFC)", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        assert hf.encode(text, add_special_tokens=False) == qwen.encode(text, allowed_special="all"), text
