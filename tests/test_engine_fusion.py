"""Engine-time model transforms: the fused gate_up MLP and the decode forward compiled by regions."""

import copy

import pytest
import torch
from torch import nn

from qwenlm.engine import EngineConfig, SamplingParams
from qwenlm.engine.compiled_decode import CompiledDecode
from qwenlm.engine.fusion import GateUpMLP, fuse_gate_up
from qwenlm.model.qwen import DenseKVCache, QWenMLP
from engine_helpers import random_prompts, reference_ids, tiny_engine, tiny_model

# The transforms compute the model's function with other matmul shapes or calls (one [2F, H] GEMM for w1 and w2;
# mm + add for addmm), whose summation order the BLAS may choose by shape, CPU and thread count: logits (|x| < 0.7
# here) and hidden states (|x| < 4) agree to a few ulps. 1e-5 leaves room for that and still fails a fusion that
# swaps gate and up (1.3e-2) or a prefill region that drops LogN (1.6e-3).
ATOL = 1e-5


def _prefill_then_decode(model, prompts, next_ids, decode=None):
    """Logits of a full prompt forward and of one decode step after it (DenseKVCache, equal lengths)."""
    B, T = len(prompts), len(prompts[0])
    cache = DenseKVCache(model.config.num_hidden_layers)
    ids = torch.tensor(prompts)
    pos = torch.arange(T)[None].expand(B, T)
    inv = model.inv_freq([1.0] * B, "cpu")
    with torch.no_grad():
        cache.begin(torch.ones(B, T, dtype=torch.bool))
        prefill = model.logits(model(ids, pos, cache, inv))
        cache.begin(torch.ones(B, 1, dtype=torch.bool))
        nid, npos = torch.tensor(next_ids)[:, None], torch.full((B, 1), T)
        if decode is None:
            step = model.logits(model(nid, npos, cache, inv, use_logn=True)[:, 0])
        else:
            step = decode(cache)(nid, npos, inv, True)
    return prefill, step


def test_gate_up_fusion_gives_the_same_logits():
    model = tiny_model(num_hidden_layers=3)
    fused = copy.deepcopy(model)
    assert fuse_gate_up(fused) == 3
    assert all(type(b.mlp) is GateUpMLP for b in fused.transformer.h)
    assert fuse_gate_up(fused) == 0  # idempotent
    prompts, nxt = random_prompts([9, 9]), [5, 7]
    for a, b in zip(_prefill_then_decode(model, prompts, nxt), _prefill_then_decode(fused, prompts, nxt)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_fused_mlp_keeps_the_official_state_dict_names():
    model = tiny_model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_gate_up(model)
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # Loading official names into the fused model fills gate_up = [w1; w2].
    other = tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    fuse_gate_up(other)
    other.load_state_dict(ref, strict=True)
    mlp = other.transformer.h[1].mlp
    assert torch.equal(mlp.gate_up.weight, torch.cat((ref["transformer.h.1.mlp.w1.weight"],
                                                      ref["transformer.h.1.mlp.w2.weight"])))


def test_fusion_leaves_quantized_layers_alone():
    from qwenlm.model.quant import GPTQLinear

    model = tiny_model()
    mlp = model.transformer.h[0].mlp
    mlp.w1 = GPTQLinear(mlp.w1.in_features, mlp.w1.out_features, bits=4, group_size=32, bias=False)
    assert fuse_gate_up(model) == 1
    assert type(model.transformer.h[0].mlp) is QWenMLP and type(model.transformer.h[1].mlp) is GateUpMLP


def test_quantized_gate_up_gives_identical_logits():
    from qwenlm.model.quant import GPTQLinear, quantize_int8_

    model = quantize_int8_(tiny_model())
    fused = copy.deepcopy(model)
    assert fuse_gate_up(fused) == model.config.num_hidden_layers
    mlp = fused.transformer.h[0].mlp
    assert type(mlp) is GateUpMLP and type(mlp.gate_up) is GPTQLinear
    prompts, nxt = random_prompts([9, 9]), [5, 7]
    for a, b in zip(_prefill_then_decode(model, prompts, nxt), _prefill_then_decode(fused, prompts, nxt)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_compiled_decode_regions_equal_the_model_and_are_shared_by_layers():
    """Regions traced with the "eager" backend run the model's ops (biased linears as mm + add): the same logits
    to ATOL, for batch 1 (static regions) and batch 3 (dynamic regions), with LogN on; one graph per
    region whatever the depth."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_hidden_layers=4)
    fuse_gate_up(model)
    torch._dynamo.reset()
    counters.clear()
    for lengths, nxt in (([7], [3]), ([6, 6, 6], [1, 2, 3])):
        prompts = random_prompts(lengths, seed=len(lengths))
        _, ref = _prefill_then_decode(model, prompts, nxt)
        _, got = _prefill_then_decode(model, prompts, nxt, lambda c: CompiledDecode(model, c, backend="eager"))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert counters["stats"]["unique_graphs"] == 10  # 5 regions x (static, dynamic), not x layers


def test_compiled_prefill_regions_equal_the_model_with_logn_and_ntk():
    """The prefill regions (flat row [1, T], per-token RoPE rows, LogN always on) give the model's hidden states
    (to ATOL: biased linears as mm + add), also past seq_length (LogN active) and with two NTK alphas in one row;
    one graph for every T >= 2, also when the first T equals a model size (16 = head_dim here: the compiler must
    not tie T to it)."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_hidden_layers=3, seq_length=16)
    fuse_gate_up(model)
    compiled = CompiledDecode(model, None, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    assert model.config.head_dim == 16
    for T, start, alphas in ((16, 0, (1.0,)), (9, 0, (1.0,)), (12, 10, (1.0, 3.0)), (5, 0, (3.0,))):
        ids = torch.tensor(random_prompts([T], seed=T))
        pos = torch.arange(start, start + T)[None]
        inv = model.inv_freq(list(alphas), "cpu")[:, 0]  # [n_alphas, r/2]
        inv_tok = inv[torch.arange(T) * len(alphas) // T][None]  # [1,T,r/2]: first part alpha 0, then alpha 1
        with torch.no_grad():
            ref_cache, cache = DenseKVCache(3), DenseKVCache(3)
            ref_cache.begin(torch.ones(1, T, dtype=torch.bool))
            cache.begin(torch.ones(1, T, dtype=torch.bool))
            ref = model(ids, pos, ref_cache, inv_tok, use_logn=start + T > 16)
            got = model.transformer.ln_f(compiled.prefill(cache, ids, pos, inv_tok))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert counters["stats"]["unique_graphs"] == 4  # prologue, attn_in, attn_out, mlp_out: one graph each


def test_engine_with_inductor_compiled_decode_matches_the_reference_loop():
    model = tiny_model()
    engine = tiny_engine(model, compile_decode=True)
    assert engine.runner.compiled and isinstance(engine.runner._decode_forward, CompiledDecode)
    prefills = []
    prefill = engine.runner._compiled.prefill
    engine.runner._compiled.prefill = lambda *a: prefills.append(a[1].shape[1]) or prefill(*a)
    prompts = random_prompts([5, 11], seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_ids(model, prompt, params)
    assert prefills  # the prompts went through the compiled prefill regions


@pytest.mark.parametrize("compile_decode,on_cuda,eager,expected", [
    (None, True, False, True), (None, False, False, False), (None, True, True, False),
    (False, True, False, False), (True, False, False, True)])
def test_compiled_decode_default_is_gpu_only(compile_decode, on_cuda, eager, expected):
    cfg = EngineConfig(compile_decode=compile_decode, enforce_eager=eager)
    assert cfg.use_compiled_decode(on_cuda) is expected


def test_engine_fuses_the_mlp_unless_told_not_to():
    model = tiny_model()
    tiny_engine(model, fuse_mlp=False)
    assert all(type(b.mlp) is QWenMLP for b in model.transformer.h)
    tiny_engine(model)
    assert all(type(b.mlp) is GateUpMLP for b in model.transformer.h)
    assert isinstance(model.transformer.h[0].mlp.gate_up, nn.Linear)
