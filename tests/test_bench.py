"""The benchmark scripts run end to end at tiny shapes on the CPU (--tiny: the same code path as on a GPU) and
write their results, so they keep working between GPU runs."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FIGURES = {"batch1_decode_tok_s", "throughput_tok_s", "throughput_int8_kv_tok_s", "ttft_short_ms",
                  "ttft_long_ms", "peak_memory_gb"}
QUANT_ROWS = {"bf16", "GPTQ Int8", "GPTQ Int4", "GPTQ Int4, int8 KV", "transformers bf16"}


def test_bench_engine_and_bench_quant_run_tiny_and_write_results(tmp_path):
    runs = {}
    for name in ("bench_engine", "bench_quant"):  # side by side: each is mostly one busy core
        cmd = [sys.executable, f"bench/{name}.py", "--tiny", "--workdir", str(tmp_path / f"work-{name}"),
               "--json", str(tmp_path / f"{name}.json")]
        runs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name, proc in runs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
        assert "====" in out  # the table

    engine = json.loads((tmp_path / "bench_engine.json").read_text())
    assert set(engine["figures"]) == ENGINE_FIGURES and engine["copy_bandwidth_gb_s"] > 0
    for key, fig in engine["figures"].items():
        assert fig["qwenlm"] > 0, key
        if key != "throughput_int8_kv_tok_s":  # transformers has no int8 KV cache
            assert fig["transformers"] > 0, key
        assert fig["bound"] is None or fig["bound"] > 0, key
    assert engine["figures"]["batch1_decode_tok_s"]["spread"][0] > 0
    assert engine["header"]["qwenlm"] and engine["header"]["torch"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench_engine.png").stat().st_size > 0

    quant = json.loads((tmp_path / "bench_quant.json").read_text())
    assert set(quant["rows"]) == QUANT_ROWS
    for name, row in quant["rows"].items():
        assert row["b1_decode_tok_s"]["median"] > 0 and row["peak_memory_gb"] > 0, name
        assert row["bound_tok_s"] > 0 and row["gb_read_per_token"] > 0, name
    # the quantized folders read fewer bytes per token than bf16, Int4 fewest
    gb = {name: row["gb_read_per_token"] for name, row in quant["rows"].items()}
    assert gb["GPTQ Int4"] < gb["GPTQ Int8"] < gb["bf16"]


def test_check_gpu_logprobs_and_train_run_tiny(tmp_path):
    """The GPU checks of the logprob and training paths run at tiny shapes and pass (the same comparisons a GPU makes
    against its kernels: here the engine's CPU path and Triton's interpreter)."""
    cmd = [sys.executable, "bench/check_gpu.py", "--tiny", "--only", "logprobs,train", "--workdir", str(tmp_path / "w"),
           "--json", str(tmp_path / "check.json")]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    checks = json.loads((tmp_path / "check.json").read_text())["checks"]
    assert set(checks) == {"logprobs", "train"} and all(c["ok"] for c in checks.values())
    assert checks["logprobs"]["compiled_False_topk_ids_equal"] is True


def test_bench_ttft_runs_tiny_and_splits_the_step(tmp_path):
    """bench_ttft's hand-made step gives the request its token (the script asserts so) and reports every piece."""
    cmd = [sys.executable, "bench/bench_ttft.py", "--tiny", "--workdir", str(tmp_path / "w"),
           "--json", str(tmp_path / "ttft.json")]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    r = json.loads((tmp_path / "ttft.json").read_text())["parts"]["ttft"]
    split = r["split_ms"]
    assert set(split) == {"schedule", "launch", "wait", "process", "total"} and min(split.values()) >= 0
    assert split["launch"] > 0 and r["ttft_ms"]["median"] > 0 and r["bound_ms"] > 0
    assert "aten::" in (tmp_path / "ttft.profile.txt").read_text()
