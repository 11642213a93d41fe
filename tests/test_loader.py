"""Every loader error names the folder, file or tensor; good folders of every layout load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlm.config import ModelConfig
from qwenlm.hub import ModelNotFoundError, resolve_model
from qwenlm.model.loader import CheckpointError, load_model
from qwenlm.testing import TINY, official_config_dict


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_model(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)


def test_wrong_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2'"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    state = load_file(ckpt / "model.safetensors")
    del state["transformer.h.1.mlp.w2.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.w2\.weight' missing"):
        load_model(ckpt, progress=False)


def test_unexpected_tensor(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'transformer\.h\.0\.attn\.q_proj"):
        load_model(ckpt, progress=False)


def test_shape_mismatch(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.ln_1.weight"] = torch.ones(65)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.ln_1\.weight' has shape \(65,\), config\.json implies \(64,\)"):
        load_model(ckpt, progress=False)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated or corrupt)"):
        load_model(ckpt, progress=False)


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load_model(ckpt, progress=False)


def test_truncated_bin(tiny_ckpt, tmp_path):
    from qwenlm.testing import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "bin", layout="bin")
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read PyTorch checkpoint"):
        load_model(folder, progress=False)


def test_shard_listed_in_index_but_missing(tmp_path):
    from qwenlm.testing import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "sharded", layout="sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: listed in model\.safetensors\.index\.json but missing"):
        load_model(folder, progress=False)


def test_dtype_auto_and_explicit(tiny_ckpt):
    assert load_model(tiny_ckpt, progress=False).lm_head.weight.dtype == torch.float32  # CPU: fp32 by the official rule
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.transformer.h[0].ln_1.weight.dtype == torch.bfloat16


def test_aug_2023_config_keys():
    cfg = ModelConfig.from_dict({"n_embd": 4096, "n_head": 32, "n_layer": 32, "ffn_hidden_size": 22016,
                                 "padded_vocab_size": 151936, "n_positions": 6144, "seq_length": 2048,
                                 "layer_norm_epsilon": 1e-5, "kv_channels": 128, "model_type": "qwen"})
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.ffn_dim, cfg.vocab_size,
            cfg.seq_length, cfg.layer_norm_epsilon) == (4096, 32, 32, 11008, 151936, 2048, 1e-5)


def test_config_without_seq_length_is_an_error():
    with pytest.raises(ValueError, match="seq_length"):
        ModelConfig.from_dict({"model_type": "qwen"}, "x/config.json")


def test_hub_name_without_network_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="--model DIR"):
        resolve_model("Qwen/Qwen-7B-Chat")
    with pytest.raises(ModelNotFoundError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("num_attention_heads"), r"config\.json: missing field 'num_attention_heads' \(or 'n_head'\)"),
    (lambda c: c.pop("vocab_size"), r"config\.json: missing field 'vocab_size' \(or 'padded_vocab_size'\)"),
    (lambda c: c.update(num_attention_heads="4"), r"config\.json: num_attention_heads must be an integer >= 1, got '4'"),
    (lambda c: c.update(hidden_size=0), r"config\.json: hidden_size must be an integer >= 1, got 0"),
    (lambda c: c.update(num_hidden_layers=2.5), r"config\.json: num_hidden_layers must be an integer >= 1, got 2\.5"),
    (lambda c: c.update(rotary_pct=0), r"config\.json: rotary_pct must be a number in \(0, 1\], got 0"),
    (lambda c: c.update(layer_norm_epsilon="1e-6"), r"config\.json: layer_norm_epsilon must be a number > 0"),
    (lambda c: c.update(use_dynamic_ntk="true"), r"config\.json: use_dynamic_ntk must be true or false, got 'true'"),
    (lambda c: c.update(kv_channels=32), r"config\.json: kv_channels 32 x num_attention_heads 4 must equal hidden_size 64"),
    (lambda c: c.pop("kv_channels"), r"config\.json: kv_channels 128 x num_attention_heads 4 must equal hidden_size 64"),
])
def test_config_json_keys_and_values_are_checked_before_any_tensor(ckpt, change, message):
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt, progress=False)


def test_bad_generation_config_fails_at_load_naming_file_and_key(ckpt, monkeypatch):
    import qwenlm
    from qwenlm import loading
    path = ckpt / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "top_p": "high"}))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ValueError, match=r"ckpt/generation_config\.json: top_p must be a number in \(0, 1\], got 'high'"):
        qwenlm.load(str(ckpt), device="cpu", progress=False)


def test_official_key_sets_still_load():
    new = json.loads(json.dumps(official_config_dict(ModelConfig.from_dict({**TINY}))))
    assert ModelConfig.from_dict(new).num_attention_heads == 4
    old = {"n_embd": 64, "n_head": 4, "n_layer": 2, "ffn_hidden_size": 256, "padded_vocab_size": 151936,
           "vocab_size": 151936, "n_positions": 6144, "seq_length": 2048, "kv_channels": 16, "rotary_pct": 1.0,
           "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-05, "bf16": False, "fp16": False, "fp32": False,
           "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True, "onnx_safe": None,
           "use_flash_attn": "auto", "params_dtype": "torch.bfloat16", "model_type": "qwen",
           "quantization_config": {"bits": 4}}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels, cfg.quantization_config) == (64, 4, 16,
                                                                                                  {"bits": 4})
