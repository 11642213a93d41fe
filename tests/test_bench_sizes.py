"""bench/bench_sizes.py runs end to end at tiny shapes on the CPU (--tiny: the code path of the GPU run), with each
size's distinctive config, and writes its rows beside Qwen's README figures."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"1_8b_bf16", "14b_bf16", "14b_int4", "72b_int4", "72b_int8", "1_8b_transformers", "14b_transformers"}
README = {"1_8b_bf16": 54.1, "1_8b_transformers": 54.1, "14b_bf16": 24.7, "14b_transformers": 24.7,
          "14b_int4": 38.7, "72b_int4": 11.3, "72b_int8": None}


def test_bench_sizes_runs_tiny_and_writes_results(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, "bench/bench_sizes.py", "--tiny", "--workdir", str(work), "--json",
                          str(tmp_path / "sizes.json")], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "==== every size on one GPU" in out.stdout
    rows = json.loads((tmp_path / "sizes.json").read_text())["rows"]
    assert set(rows) == ROWS
    for name, row in rows.items():
        assert row["readme_a100_tok_s"] == README[name], name
        assert row["b1_decode_tok_s"]["median"] > 0 and row["bound_tok_s"] > 0, name
        if not name.endswith("transformers"):
            assert row["throughput"]["output_tok_s"] > 0 and row["throughput"]["tokens"] == 4 * 4, name
            assert row["throughput_bound_tok_s"] > row["bound_tok_s"], name
    assert rows["14b_int4"]["gb_read_per_token"] < rows["14b_bf16"]["gb_read_per_token"]
    assert rows["72b_int4"]["gb_read_per_token"] < rows["72b_int8"]["gb_read_per_token"]
    assert not any(work.glob("qwen-*"))  # each size's folders deleted once done (no --keep)


def test_tiny_folders_keep_each_size_apart():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_sizes
    finally:
        sys.path.pop(0)
    big = bench_sizes.shape_of("72b", tiny=True)
    assert big["rotary_emb_base"] == 1000000 and big["use_dynamic_ntk"] is False and big["seq_length"] == 32768
    assert bench_sizes.shape_of("14b", tiny=False)["vocab_size"] == 152064
    # 72B Int4 is about 41 GB (spec / Qwen's README), Int8 does not fit an 80 GB H100
    assert 38e9 < bench_sizes.folder_bytes("72b", "int4", False) < 45e9
    assert bench_sizes.folder_bytes("72b", "int8", False) > 0.9 * 80e9 - 4e9
