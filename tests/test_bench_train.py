"""bench/bench_train.py runs end to end at tiny shapes on the CPU (--tiny: the same code path as on a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_runs_tiny_and_writes_results(tmp_path):
    # Q-LoRA needs LoRA on GPTQ layers (qwenlm.train.qlora); where this checkout has it, its part runs too
    parts = ["lora", "full", "transformers"] + (["qlora"] if importlib.util.find_spec("qwenlm.train.qlora") else [])
    cmd = [sys.executable, "bench/bench_train.py", "--tiny", "--workdir", str(tmp_path / "work"),
           "--json", str(tmp_path / "train.json"), "--only", ",".join(parts)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "official A100 GB" in proc.stdout  # the table, with the official figures beside
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert set(rows) == {f"{p} 64" for p in parts}
    for name, row in rows.items():
        assert row["tok_s"] > 0 and row["s_per_iter"] > 0 and row["peak_gb"] > 0, name
        assert row["tokens"] == 2 * 64, name  # one timed iteration: 2 samples of 64 tokens
