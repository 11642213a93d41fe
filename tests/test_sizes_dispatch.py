"""Which GPU kernel each Qwen size's layers take (docs/sizes.md), decided on the CPU from the dispatch tables: the
batch-1 GPTQ GEMV launch (`gptq_gemv.gemv_config`), the fused Int4 decode step's shape conditions, the paged
decode attention's config, for every size alone and split over 2-8 ranks; and the scaled GEMV launches run in
the Triton interpreter against the GPTQ definition."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from qwenlm.config import ModelConfig
from qwenlm.kernels import gptq_gemv
from qwenlm.kernels.attention_config import decode_config
from qwenlm.kernels.gptq_fused import fusable_shape
from qwenlm.parallel.tp import TPError, TPPlan
from qwenlm.testing import SIZES, size_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPTQ = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq"}


def layer_shapes(size: str, world: int, bits: int = 4):
    """(name, N, K) of a block's GPTQ linears on each rank (decode order; gate_up = w1 + w2 after fusion)."""
    cfg = ModelConfig.from_dict({**size_config(size), "quantization_config": {**GPTQ, "bits": bits}})
    plan = TPPlan(cfg, world)
    H, cols = cfg.hidden_size, plan.heads * cfg.head_dim
    for f in sorted(set(plan.ffn)):
        yield from (("c_attn", 3 * cols, H), ("attn.c_proj", H, cols), ("gate_up", 2 * f, H), ("w1", f, H),
                    ("mlp.c_proj", H, f))


SPLITS = [(size, world) for size in SIZES for world in (1, 2, 4, 8)
          if SIZES[size]["num_attention_heads"] % world == 0]


def test_the_7b_shapes_keep_their_measured_launches():
    for bits, n, k in gptq_gemv.SWEPT_CONFIGS:
        cfg = gptq_gemv.GEMV_CONFIGS[(bits, n, k)]
        assert gptq_gemv.gemv_config(bits, n, k) == (tuple(cfg) + (0,))[:6]


@pytest.mark.parametrize("size,world", SPLITS)
def test_every_gptq_gemv_takes_a_swept_kernel_at_a_swept_occupancy(size, world):
    """Int4: the v4 GEMV at every layer (no fall back to the first kernel, `_gemv_kernel`, 10-27% slower at 7B);
    Int8: the kernel swept at the nearest 7B shape. Programs in flight: within 2x of that swept launch's, unless
    every K tile already has its own split."""
    for bits in (4, 8):
        for name, n, k in layer_shapes(size, world, bits):
            cfg = gptq_gemv.gemv_config(bits, n, k)
            block_n, block_k, split_k, _, _, kernel = cfg
            assert k % 128 == 0 and n % (32 // bits) == 0, (size, name, n, k)
            if bits == 4:
                assert kernel == 4, (size, world, name, cfg)  # and gemv() keeps v4: K whole groups of 128
            near = min((key for key in gptq_gemv.SWEPT_CONFIGS if key[0] == bits),
                       key=lambda key: (abs(math.log(key[1] / n)) + abs(math.log(key[2] / k)), key))
            swept = (tuple(gptq_gemv.SWEPT_CONFIGS[near]) + (0,))[:6]
            assert (block_n, block_k, kernel) == (swept[0], swept[1], swept[5])
            programs, target = -(-n // block_n) * split_k, -(-near[1] // block_n) * swept[2]
            assert target / 2 <= programs <= 2 * target or split_k == -(-k // block_k), (size, name, cfg, target)


@pytest.mark.parametrize("size,world", SPLITS)
def test_int4_layers_fit_the_fused_decode_step(size, world):
    """The fused batch-1 Int4 step (`engine.fused_decode.supports`) needs every linear `fusable` and an MLP width a
    multiple of 64 on every rank; else the whole model drops to the per-layer GEMVs."""
    for name, n, k in layer_shapes(size, world):
        assert fusable_shape(4, 128, k, n), (size, world, name, n, k)
        if name == "w1":
            assert n % 64 == 0


def test_attention_config_depends_on_batch_not_heads():
    """The paged decode kernels run one program per (sequence, head[, split]) with HEAD_DIM 128: every size's heads
    (16 / 32 / 40 / 64, and their TP slices) take the same table; batch 1 splits the context."""
    for size in SIZES:
        assert ModelConfig.from_dict(size_config(size)).head_dim == 128
    assert decode_config(1, False).kernel == "mma" and decode_config(1, False).splits == 16
    assert decode_config(128, True).kernel == "v1"


def test_tp_sizes_per_model():
    """Where heads and vocabulary allow it: 14B's 40 heads split over 5 but its 152,064 rows do not, nor do 40
    heads over 16; 1.8B's 16 heads up to 16."""
    cfg = ModelConfig.from_dict(size_config("14b"))
    assert [w for w in (2, 4, 5, 8, 16) if _ok(cfg, w)] == [2, 4, 8]
    assert _ok(ModelConfig.from_dict(size_config("1_8b")), 16)


def _ok(cfg, world):
    try:
        TPPlan(cfg, world)
        return True
    except TPError:
        return False


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton has no build for this platform (a [test] dependency on Linux, where this runs)")
def test_scaled_gemv_launches_match_the_reference_in_interpreter():
    """Shapes outside the table (odd split counts from the rescaling) against the plain-torch GPTQ definition."""
    code = r'''
import torch
from qwenlm.kernels import gptq_gemv as G, gptq_matmul as K
from qwenlm.model import quant
torch.manual_seed(0)
for bits, k, n in ((4, 1408, 640), (8, 1408, 640), (4, 640, 1920)):
    g = 128
    assert (bits, n, k) not in G.GEMV_CONFIGS and G.gemv_config(bits, n, k)[2] not in (1, 2, 4, 8, 16, 32)
    qw = quant.pack_rows(torch.randint(0, 2 ** bits, (k, n)), bits)
    qz = quant.pack_cols(torch.randint(0, 2 ** bits - 1, (k // g, n)), bits)
    s = (torch.rand(k // g, n) * 0.01).half()
    gi = (torch.arange(k) // g).int()
    x = torch.randn(1, k).half()
    ref = K.gptq_matmul_reference(x, qw, qz, s, gi, bits).float()
    out = K.gptq_matmul(x, qw, qz, s, g, bits, workspace=G.gemv_workspace(n, "cpu")).float()
    assert (out - ref).abs().max().item() < 2e-3 * ref.abs().max().item() + 2e-3, (bits, n, k)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
