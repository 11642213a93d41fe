"""The one-launch argmax of greedy decoding (qwenlm.kernels.argmax) against torch.argmax, in the Triton
interpreter: ties inside a chunk and across chunks, NaN, -0.0 beside +0.0, all -inf, fp16 rows, a vocabulary that
is no multiple of the chunk, repeated calls (the arrival counts are left at zero)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton has no build for this platform (a [test] dependency on Linux, where this runs)")
def test_argmax_rows_equals_torch_argmax_in_interpreter():
    code = textwrap.dedent("""
        import torch
        from qwenlm.kernels.argmax import _WORKSPACES, argmax_rows
        torch.manual_seed(0)
        x = torch.randn(6, 10000)
        top = x[1].max() + 1
        x[1, 7001] = top; x[1, 7000] = top; x[1, 9999] = top  # the first of three, two in one chunk
        x[2, 5000] = float("nan"); x[2, 123] = -float("nan"); x[2, 9000] = float("inf")  # the first NaN, signed
        x[3] = -x[3].abs() - 1; x[3, 4000] = -0.0; x[3, 4001] = 0.0; x[3, 20] = -0.0  # zeros compare equal
        x[4] = float("-inf")
        x[5, 9990] = 50.0  # in the last, partial chunk
        want = x.argmax(dim=1)
        assert want.tolist()[1:] == [7000, 123, 20, 0, 9990]
        for block in (1024, 4096, 16384):
            for _ in range(2):
                got = argmax_rows(x, block=block)
                assert got.dtype == torch.int64 and torch.equal(got, want), (block, got, want)
        assert all(not cnt.any() for _, cnt in _WORKSPACES.values())
        h = x[:, :9000].half()
        assert torch.equal(argmax_rows(h, block=2048), h.argmax(dim=1))
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
