"""The fused batch-1 Int4 decode (qwenlm.kernels.gptq_fused, qwenlm.engine.fused_decode) in the Triton
interpreter: one decode step of a tiny GPTQ Int4 model through the five launches per layer equals the model's
own step (RMSNorm, GEMVs, RoPE, LogN past seq_length, attention, SiLU * up, residual adds, biases)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton has no build for this platform (a [test] dependency on Linux, where this runs)")
def test_fused_int4_decode_step_matches_model_in_interpreter():
    """Runs in a subprocess: TRITON_INTERPRET must be set before triton is imported."""
    code = r'''
import copy
import torch
from qwenlm.config import ModelConfig
from qwenlm.engine import compiled_decode, fused_decode
from qwenlm.engine.fusion import fuse_gate_up
from qwenlm.kernels import gptq_fused, gptq_gemv
from qwenlm.model import quant
from qwenlm.model.qwen import DenseKVCache, QWenLMHeadModel

torch.manual_seed(0)
# Two heads of 128 (RoPE partners 64 apart inside a 128-column block), ffn 384 (c_proj's K: three 128-blocks),
# seq_length 8 so that LogN scales the query of position 11.
cfg = ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, kv_channels=128,
                  intermediate_size=768, seq_length=8, max_position_embeddings=64)
torch.set_default_dtype(torch.float16)
model = QWenLMHeadModel(cfg).eval()
torch.set_default_dtype(torch.float32)
quant.prepare_gptq(model, {"bits": 4, "group_size": 128})
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))  # norms ~1, embeddings ~0.5
    for layer in model.modules():
        if isinstance(layer, quant.GPTQLinear):
            k, n = layer.in_features, layer.out_features
            layer.qweight = quant.pack_rows(torch.randint(0, 16, (k, n)), 4)
            layer.qzeros = quant.pack_cols(torch.randint(0, 15, (k // 128, n)), 4)
            layer.scales = (torch.rand(k // 128, n) * 0.01 + 0.005).half()
            layer.bias = (torch.randn(n) * 0.1).half()
for layer in model.modules():
    if isinstance(layer, quant.GPTQLinear):
        layer.prepare_kernel()
assert fuse_gate_up(model) == 2 and fused_decode.supports(model)

ids = torch.randint(0, 512, (1, 12))
pos = torch.arange(12)[None]
inv = model.inv_freq([1.0], "cpu")

def prefix_cache():
    ctx = DenseKVCache(2)
    ctx.begin(torch.ones(1, 11, dtype=torch.bool))
    model(ids[:, :11], pos[:, :11], ctx, inv, use_logn=True)
    ctx.begin(torch.ones(1, 1, dtype=torch.bool))
    return ctx

with torch.no_grad():
    ref = model(ids[:, 11:], pos[:, 11:], prefix_cache(), inv, use_logn=True)[0, 0].float()  # its own step
    x, cos, sin, q_scale = compiled_decode.prologue(model, ids[:, 11:], pos[:, 11:], inv, True)
    assert float(q_scale) > 1.05  # LogN is active at position 11 > seq_length 8
    ws = [l._workspace for l in model.modules() if isinstance(l, quant.GPTQLinear)]
    for _ in range(2):  # twice: the split-K workspaces are left zeroed for the next call
        out = model.transformer.ln_f(fused_decode.FusedInt4Blocks(model)(prefix_cache(), x, cos, sin,
                                                                                    q_scale))[0, 0].float()
        assert all(not w.any() and not c.any() for w, c in ws)
        err = (out - ref).abs().max().item()
        assert err <= 4e-3, err  # one fp16 step at |x| ~ 4: the same rounding points (0 in the interpreter)
    # without LogN (use_logn False) the fused step still matches
    ref2 = model(ids[:, 11:], pos[:, 11:], prefix_cache(), inv, use_logn=False)[0, 0].float()
    out2 = model.transformer.ln_f(fused_decode.FusedInt4Blocks(model)(prefix_cache(), x, cos, sin,
                                                                                 None))[0, 0].float()
    assert (out2 - ref2).abs().max().item() <= 4e-3 and (ref2 - ref).abs().max().item() > 0.05

# single fused GEMVs against the dequantized definition, with several stream-K grids (BLOCK_N, BLOCK_K, programs):
# runs of work units that end inside a column block, span several, or complete one on another program's segment;
# gate_up's up * silu(gate) epilogue (bias included), and the residual add with fp16 inputs read in place or bf16
# ones copied to the fp16 row
gate_up, c_proj = model.transformer.h[0].mlp.gate_up, model.transformer.h[0].mlp.c_proj
x = torch.randn(256).half()
for config in ((128, 128, 2, 1, 1), (256, 64, 3, 2, 2), (128, 64, 5, 1, 2), (128, 32, 7, 1, 1)):
    y = (x.float() @ gate_up.dequantized_weight() + gate_up.bias.float()).half().float()
    up, gate = y.split(384)
    want = (up * torch.nn.functional.silu(gate).half().float()).half().float()
    got = gptq_fused.fused_int4_gemv(x, gate_up, glu=384, config=config)[0].float()
    assert got.shape == (384,) and (got - want).abs().max().item() <= 1e-3 * want.abs().max().item(), config
    for dtype in (torch.float16, torch.bfloat16):
        act = torch.randn(384).to(dtype)
        res = torch.randn(256).to(dtype)
        y = (act.half().float() @ c_proj.dequantized_weight() + c_proj.bias.float()).to(dtype).float()
        want = (y + res.float()).to(dtype).float()
        got = gptq_fused.fused_int4_gemv(act, c_proj, residual=res, config=config)
        tol = 1.6e-2 * want.abs().max().item()  # two steps of bf16 (2^-8 each) at the largest output
        assert got.dtype == dtype and (got[0].float() - want).abs().max().item() <= tol, (config, dtype)
        # the batch-1 GEMV (the v4 kernel here) reads bf16 inputs through fp16 too
        gptq_gemv.GEMV_CONFIGS[(4, 256, 384)] = (128, 128, 2, 1, 1, 4)
        ref = (act.half().float() @ c_proj.dequantized_weight() + c_proj.bias.float()).to(dtype).float()
        assert (c_proj(act[None]).float() - ref).abs().max().item() <= tol, dtype
    assert all(not w.any() and not c.any() for w, c in ws), config  # left zeroed for the next call

# attn c_proj reading a batch-1 attention's context splits uncombined (SplitPartials, two heads of 128, 4 splits,
# some unused): equal to combining them first, as the attention does, then projecting
from qwenlm.kernels.attention import SplitPartials
S = 4
m = torch.randn(2, S) * 3
m[0, 3] = m[1, 1:] = float("-inf")  # unused splits: (-inf, 0, zeros)
l_sum = (torch.rand(2, S) + 0.5) * (m > float("-inf"))
acc = torch.randn(2, S, 128) * (m > float("-inf"))[..., None]
w = torch.exp(m - m.max(1, keepdim=True).values)
combined = ((acc * w[..., None]).sum(1) / (l_sum * w).sum(1)[:, None]).reshape(-1)
parts = SplitPartials(torch.stack([m.reshape(-1), l_sum.reshape(-1)]).contiguous(), acc.reshape(-1).contiguous(), S)
attn_proj = model.transformer.h[0].attn.c_proj
for dtype in (torch.float16, torch.bfloat16):
    res = torch.randn(256).to(dtype)
    y = (combined.to(dtype).half().float() @ attn_proj.dequantized_weight() + attn_proj.bias.float()).to(dtype)
    want = (y.float() + res.float()).to(dtype).float()
    # programs per column block 2 (runs of 2 K tiles), 1 (8 tiles of 32), and 1 program for 2 blocks (stream-K)
    for config in ((128, 64, 4, 1, 2), (128, 32, 3, 1, 1), (128, 128, 1, 1, 1)):
        got = gptq_fused.fused_int4_gemv(parts, attn_proj, residual=res, config=config)
        tol = 1.6e-2 * want.abs().max().item()
        assert got.dtype == dtype and (got[0].float() - want).abs().max().item() <= tol, (config, dtype)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
