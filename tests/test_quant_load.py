"""`qwenlm.load(..., quantize="int8")`, EngineConfig(kv_cache_dtype="int8") through the API, and the CLI flags."""

import subprocess
import sys

import pytest
import torch

import qwenlm
from qwenlm import cli
from qwenlm.engine import EngineConfig
from qwenlm.model import quant
from qwenlm.quantize import quantize_model

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def test_load_quantize_int8_swaps_block_linears_and_stays_close(tiny_ckpt):
    ref = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)
    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False, quantize="int8",
                      engine_config=EngineConfig(kv_cache_dtype="int8", num_blocks=64))
    for block, ref_block in zip(llm.model.transformer.h, ref.model.transformer.h):
        for name in BLOCK_LINEARS:
            layer, lin = block.get_submodule(name), ref_block.get_submodule(name)
            assert isinstance(layer, quant.GPTQLinear) and layer.bits == 8 and isinstance(lin, torch.nn.Linear)
            # per-channel symmetric int8: each weight within half a step of its row's scale
            w = layer.dequantized_weight().t()
            step = lin.weight.abs().amax(1, keepdim=True) / 127
            assert ((w - lin.weight).abs() <= 0.5 * step + 1e-7).all()
    assert isinstance(llm.model.lm_head, torch.nn.Linear)  # lm_head and embeddings stay as loaded
    text = llm.generate("Hello", max_new_tokens=4, temperature=0)
    assert isinstance(text, str) and llm.engine.runner.k_cache.dtype == torch.uint8
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        qwenlm.load(str(tiny_ckpt), device="cpu", progress=False, quantize="int4")


def test_load_quantize_refuses_a_gptq_folder(tiny_ckpt, tmp_path):
    calib = [" ".join(f"word{i * 7 + j}" for j in range(40)) for i in range(4)]
    gptq = quantize_model(tiny_ckpt, calib, 8, 32, tmp_path / "tiny-Int8", max_len=32, progress=False)
    with pytest.raises(ValueError, match="already GPTQ-quantized"):
        qwenlm.load(str(gptq), device="cpu", progress=False, quantize="int8")
    assert isinstance(qwenlm.load(str(gptq), device="cpu", progress=False).model.transformer.h[0].mlp.w1,
                      quant.GPTQLinear)


def test_cli_flags_reach_load_and_engine(tiny_ckpt, monkeypatch):
    seen = {}
    real_load = qwenlm.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(qwenlm, "load", spy)
    for command in (["generate", "Hi"], ["chat"], ["serve"]):
        args = cli.build_parser().parse_args(command + ["--model", str(tiny_ckpt), "--quantize", "int8",
                                                        "--kv-cache-dtype", "int8"])
        assert args.quantize == "int8" and args.kv_cache_dtype == "int8"
    args = cli.build_parser().parse_args(["generate", "Hi", "--model", str(tiny_ckpt), "--device", "cpu",
                                          "--quantize", "int8", "--kv-cache-dtype", "int8"])
    llm = cli._load(args)
    assert seen["quantize"] == "int8" and seen["engine_config"].kv_cache_dtype == "int8"
    assert isinstance(llm.model.transformer.h[0].attn.c_attn, quant.GPTQLinear)
    defaults = cli.build_parser().parse_args(["generate", "Hi"])
    assert defaults.quantize is None and defaults.kv_cache_dtype == "auto"


def test_cli_generate_with_int8_weights_and_kv_cache(tiny_ckpt):
    cmd = [sys.executable, "-m", "qwenlm.cli", "generate", "Hello", "--model", str(tiny_ckpt), "--device", "cpu",
           "--quantize", "int8", "--kv-cache-dtype", "int8", "--max-new-tokens", "5", "--temperature", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False, quantize="int8",
                      engine_config=EngineConfig(kv_cache_dtype="int8"))
    assert res.stdout == llm.generate("Hello", max_new_tokens=5, temperature=0) + "\n"
    bad = subprocess.run(cmd[:-6] + ["--kv-cache-dtype", "fp8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr
