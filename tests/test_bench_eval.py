"""bench/bench_eval.py end to end at tiny shapes on the CPU (--tiny: the same code path as on a GPU): synthetic
MMLU files in the official layout, `qwenlm eval mmlu` and the official one-question-per-forward method on the
same weights, which must pick the same letters."""

import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_eval_runs_tiny_and_both_methods_agree(tmp_path):
    cmd = [sys.executable, "bench/bench_eval.py", "--tiny", "--workdir", str(tmp_path), "--json",
           str(tmp_path / "eval.json")]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "==== MMLU 5-shot" in run.stdout and "extrapolated to 12" in run.stdout
    assert "target: the whole MMLU 5-shot in <= 2 min on one H100" in run.stdout
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["subjects"] == 3 and res["questions"] == 12
    q, o = res["qwenlm"], res["official"]
    assert q["items"] == 12 and q["score_s"] > 0 and q["wall_s"] >= q["load_s"] > 0
    assert o["sample_items"] == 6 and o["extrapolated_score_s"] == o["per_item_s"] * 12
    # fp32 on the CPU: the batched eval and one forward per question choose the same letter every time
    assert res["agreement"] == 1.0 and res["speedup_scoring"] > 0
    data = tmp_path / "mmlu-synthetic-tiny"
    rows = list(csv.reader(open(data / "test" / "abstract_algebra_test.csv", newline="")))
    assert len(rows) == 4 and all(len(r) == 6 and r[5] in "ABCD" for r in rows)  # MMLU's headerless layout
    assert len(list(csv.reader(open(data / "dev" / "anatomy_dev.csv", newline="")))) == 5


def test_synthetic_data_has_mmlus_real_counts(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_eval
    finally:
        sys.path.pop(0)
    from qwenlm.eval.subjects import SUBJECTS
    assert set(bench_eval.MMLU_TEST_SIZES) == set(SUBJECTS["mmlu"]) and len(SUBJECTS["mmlu"]) == 57
    assert sum(bench_eval.MMLU_TEST_SIZES.values()) == 14042
