"""The Int4 batch-1 GEMV `_gemv_kernel_v4` (qwenlm.kernels.gptq_gemv) against the plain-torch definition, in
the Triton interpreter (the GPU path differs only in the inline-PTX half2 arithmetic, whose exactness is checked
here in numpy), plus its fallbacks and an act-order layer through it."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_half2_unpacking_is_exact():
    """`_int4_word_fma`'s arithmetic, in fp16 as the GPU does it: (0x6400 | q) is 1024 + q and (0x6400 | q << 4)
    is 1024 + 16 q; one FMA by 2^-8 (2^-12) with the zero term -(4 + z/256) (-(1/4 + z/256)), built from the
    bits as the kernel builds it, gives (q - z)/256 exactly for every 4-bit q and stored zero z - 1."""
    def half(bits):
        return np.array([bits], dtype=np.uint16).view(np.float16)[0]

    for q in range(16):
        for z in range(1, 17):
            lo = np.float16(np.float32(half(0x6400 | q)) * np.float32(half(0x1C00))
                            + np.float32(half((z | 0x4400) ^ 0x8000)))
            hi = np.float16(np.float32(half(0x6400 | (q << 4))) * np.float32(half(0x0C00))
                            + np.float32(half(((z << 4) | 0x3400) ^ 0x8000)))
            assert lo == hi == np.float16((q - z) / 256), (q, z, lo, hi)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton has no build for this platform (a [test] dependency on Linux, where this runs)")
def test_kernel_source_survives_torch_compile():
    """torch.compile (Inductor) copies a user Triton kernel's source, with every jit function it calls, into a
    string literal of a generated module: an escape sequence in that source (a "\\n" in an asm string) is decoded
    there and the generated module no longer parses -- the compiled decode then fails for every GPTQ model."""
    from triton import JITFunction

    from qwenlm.kernels import gptq_gemv as G, gptq_matmul as K
    jitted = [v for m in (G, K) for v in vars(m).values() if isinstance(v, JITFunction)]
    assert any(f.__name__ == "_gemv_kernel_v4" for f in jitted)
    for f in jitted:
        assert "\\" not in f.src, f.__name__


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton has no build for this platform (a [test] dependency on Linux, where this runs)")
def test_v4_gemv_matches_reference_in_interpreter():
    """Runs in a subprocess: TRITON_INTERPRET must be set before triton is imported."""
    code = r'''
import torch
from qwenlm.kernels import gptq_gemv as G, gptq_matmul as K
from qwenlm.model import quant
torch.manual_seed(0)

def case(k, n, g, bits=4):
    qw = quant.pack_rows(torch.randint(0, 2 ** bits, (k, n)), bits)
    qz = quant.pack_cols(torch.randint(0, 2 ** bits - 1, (-(-k // g), n)), bits)
    s = (torch.rand(-(-k // g), n) * 0.01).half()
    gi = (torch.arange(k) // g).int()
    return qw, qz, s, gi

def check(x, qw, qz, s, gi, g, bits, b, cfg, ws=None):
    ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits, b).float()
    out = K.gptq_matmul(x, qw, qz, s, g, bits, b, config=cfg, workspace=ws).float()
    err = (out - ref).abs().max().item()
    assert err < 2e-3 * ref.abs().max().item() + 2e-3, (x.shape, qw.shape, g, bits, cfg, err)

# (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, 4): one program per column block or split over K (the fused
# reduction leaves its workspace zeroed), whole groups or parts of one per iteration, plain or pipelined loads;
# N not a multiple of BLOCK_N (masked columns); groups of 32, 64 and 128
for k, n, g in ((256, 96, 64), (384, 256, 128), (128, 64, 32)):
    qw, qz, s, gi = case(k, n, g)
    b = torch.randn(n).half()
    ws = G.gemv_workspace(n, "cpu")
    x = torch.randn(1, k).half()
    for cfg in ((128, 128, 1, 1, 1, 4), (128, 128, 3, 1, 2, 4), (256, 128, 8, 2, 3, 4),
                (64, 128, 2, 1, 1, 4), (128, 32, 5, 1, 2, 4), (128, 48, 64, 1, 1, 4)):
        for _ in range(2):
            check(x, qw, qz, s, gi, g, 4, b, cfg, ws)
            assert not ws[0].any() and not ws[1].any()
    check(x, qw, qz, s, gi, g, 4, None, (128, 128, 2, 1, 1, 4), ws)

# fallbacks keep a v4 setting usable: K not a multiple of the group (v2), Int8 (v1)
qw, qz, s, gi = case(320, 64, 128)
check(torch.randn(1, 320).half(), qw, qz, s, gi, 128, 4, None, (64, 128, 2, 1, 1, 4))
qw, qz, s, gi = case(256, 64, 64, bits=8)
check(torch.randn(1, 256).half(), qw, qz, s, gi, 64, 8, None, (64, 128, 2, 1, 1, 4))

# act-order layer (shuffled g_idx) whose batch-1 shape the table sends to v4 equals the dequantize path
layer = quant.GPTQLinear(256, 128, 4, 64)
layer.qweight = quant.pack_rows(torch.randint(0, 16, (256, 128)), 4)
layer.qzeros = quant.pack_cols(torch.randint(0, 15, (4, 128)), 4)
layer.scales = (torch.rand(4, 128) * 0.01).half()
layer.g_idx = (torch.randperm(256) // 64).int()
x = torch.randn(1, 256).half()
ref = layer(x).float()
layer.prepare_kernel()
G.GEMV_CONFIGS[(4, 128, 256)] = (128, 128, 2, 1, 1, 4)
assert layer.backend == "triton" and layer.perm is not None
assert (layer(x).float() - ref).abs().max().item() < 2e-3 * ref.abs().max().item() + 2e-3
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
