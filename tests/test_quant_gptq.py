"""GPTQ algorithm and `quantize_model`: beats round-to-nearest, official folder layout, reload, act-order, interrupts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qwenlm import files
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import DenseKVCache
from qwenlm.quantize import quantize_model
from qwenlm.quantize import run as qrun
from qwenlm.quantize.calib import conversation_ids, load_calibration
from qwenlm.quantize.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from qwenlm.testing import make_tiny_checkpoint
from qwenlm.tokenizer import Tokenizer

CALIB = [" ".join(f"word{i * 7 + j}" for j in range(60)) for i in range(12)]
CONVS = [{"conversations": [{"from": "user", "value": f"question {i}?"},
                            {"from": "assistant", "value": f"answer number {i} " * 10}]} for i in range(4)]


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory):
    """A tiny checkpoint with correlated features (low-rank embeddings) and a few large norm channels,
    as real LLM activations have; on isotropic activations GPTQ has nothing to exploit over rounding."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny", seed=1)
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = (torch.randn(wte.shape[0], 8, generator=gen) @ torch.randn(8, wte.shape[1], generator=gen)
                                       + 0.3 * torch.randn(wte.shape, generator=gen)) * 0.02
    for name, t in state.items():
        if name.endswith(("ln_1.weight", "ln_2.weight")):
            t[torch.randperm(t.numel(), generator=gen)[:6]] *= 8
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def forward(model, ids):
    ids = torch.tensor(ids)
    ctx = DenseKVCache(model.config.num_hidden_layers)
    ctx.begin(torch.ones_like(ids, dtype=torch.bool))
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(ids, pos, ctx, model.inv_freq([1.0], "cpu")))


def test_gptq_layer_error_below_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    K, N = 128, 64
    mix = torch.randn(K, K) / K ** 0.5 + torch.eye(K)
    x = torch.randn(2048, K) @ mix  # correlated inputs
    w = torch.randn(N, K) * 0.02
    acc = HessianAccumulator(K, "cpu")
    for chunk in x[:1024].split(64):
        acc.add(chunk[None])
    held = x[1024:]
    ref = held @ w.t()
    for act_order in (False, True):
        g = gptq_quantize(w, acc.H.clone(), bits=4, group_size=32, act_order=act_order)
        r = rtn_quantize(w, bits=4, group_size=32)
        e_gptq = (held @ g.dequantize().t() - ref).pow(2).mean()
        e_rtn = (held @ r.dequantize().t() - ref).pow(2).mean()
        assert e_gptq < 0.8 * e_rtn, (act_order, e_gptq, e_rtn)
        assert g.q.min() >= 0 and g.q.max() <= 15
        if act_order:
            assert not torch.equal(g.g_idx, torch.arange(K).int() // 32)  # permuted groups


def test_quantize_model_writes_official_layout_and_reloads(outlier_ckpt, tmp_path):
    out = quantize_model(outlier_ckpt, CALIB, 4, 32, tmp_path / "tiny-Int4", max_len=64, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "quantize_config.json", "qwen.tiktoken", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fp16"] is True and cfg["bf16"] is False
    assert cfg["quantization_config"] == {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False,
                                          "static_groups": False, "sym": True, "true_sequential": True,
                                          "model_name_or_path": None, "model_file_base_name": "model",
                                          "quant_method": "gptq"}
    qc = json.loads((out / "quantize_config.json").read_text())
    assert "quant_method" not in qc and qc["bits"] == 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.h.0.mlp.c_proj.bias").abs().sum() == 0  # zeros where fp has no bias
        assert f.get_tensor("transformer.h.0.attn.c_attn.scales").dtype == torch.float16
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
        zeros = f.get_tensor("transformer.h.0.attn.c_attn.qzeros")
        assert (((zeros.view(-1, 1) >> torch.arange(0, 32, 4)) & 15) == 7).all()  # sym 4-bit: zero 8 stored 7
    assert "transformer.h.1.mlp.w2.qweight" in names and "transformer.h.1.mlp.w2.weight" not in names
    # The folder reloads and computes what the quantizer's in-memory model computed.
    fp = load_model(outlier_ckpt, "cpu", torch.float32, progress=False)
    mem = load_model(outlier_ckpt, "cpu", torch.float32, progress=False)
    tok = Tokenizer.from_folder(outlier_ckpt)
    qrun.gptq_quantize_blocks(mem, load_calibration(CALIB, tok, 64), 4, 32, progress=False)
    for name in ("lm_head.weight", "transformer.wte.weight"):  # written as fp16
        mem.get_parameter(name).data = mem.get_parameter(name).data.half().float()
    reloaded = load_model(out, "cpu", torch.float32, progress=False)
    held = [tok.encode(" ".join(f"other{i}" for i in range(40)))[:64]]  # not in the calibration set
    torch.testing.assert_close(forward(reloaded, held), forward(mem, held), rtol=2e-3, atol=2e-3)
    # GPTQ beats round-to-nearest on held-out data (same grid, same 4 bits).
    rtn = load_model(outlier_ckpt, "cpu", torch.float32, progress=False)
    for block in rtn.transformer.h:
        for name in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            lin = block.get_submodule(name)
            lin.weight.data = rtn_quantize(lin.weight, 4, 32).dequantize()
    ref = forward(fp, held)
    e_gptq = (forward(reloaded, held) - ref).pow(2).mean()
    e_rtn = (forward(rtn, held) - ref).pow(2).mean()
    print("logit mse gptq", e_gptq.item(), "rtn", e_rtn.item())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_act_order_folder_has_permuted_g_idx_and_loads_correctly(outlier_ckpt, tmp_path):
    out = quantize_model(outlier_ckpt, CONVS, 8, 32, tmp_path / "tiny-Int8-act", act_order=True, max_len=64,
                         progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    model = load_model(out, "cpu", torch.float32, progress=False)
    layer = model.transformer.h[0].mlp.w2
    assert not torch.equal(layer.g_idx, torch.arange(layer.in_features, dtype=torch.int32) // 32)
    fp = load_model(outlier_ckpt, "cpu", torch.float32, progress=False)
    w_fp = fp.transformer.h[0].mlp.w2.weight.t()
    w_q = layer.dequantized_weight()
    assert (w_q - w_fp).abs().max() < 0.05 * w_fp.abs().max()  # 8-bit: close to the original weights


def test_interrupted_quantize_leaves_nothing(outlier_ckpt, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = qrun.gptq_quantize

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(qrun, "gptq_quantize", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(outlier_ckpt, CALIB, 4, 32, tmp_path / "out", max_len=64, progress=False)
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output folder, no leftover temporary sibling

    def fail_on_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(qrun, "gptq_quantize", real)
    monkeypatch.setattr(qrun, "save_safetensors", fail_on_write)
    with pytest.raises(OSError):
        quantize_model(outlier_ckpt, CALIB, 4, 32, tmp_path / "out", max_len=64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_conversation_calibration_tokens_follow_finetune_format():
    tok = Tokenizer.from_file()
    ids = conversation_ids(tok, CONVS[0]["conversations"], 8192)
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nquestion 0?"
                    "<|im_end|>\n<|im_start|>assistant\n" + "answer number 0 " * 10 + "<|im_end|>\n")
    assert ids[:1] == [151644] and tok.encode("<|im_start|>user", allowed_special="all") == [151644, 872]
    assert len(conversation_ids(tok, CONVS[0]["conversations"], 10)) == 10


@pytest.mark.parametrize("name,content,message", [
    ("roles.json", [{"conversations": [{"role": "user", "content": "hi"}]}],
     r"roles\.json: sample 0, conversations\[0\]: missing 'from' \(the official format is .*keys 'role', 'content'\)"),
    ("empty-conv.json", [CONVS[0], {"conversations": []}],
     r"empty-conv\.json: sample 1: 'conversations' must be a non-empty list"),
    ("sharegpt.json", [{"conversations": [{"from": "human", "value": "hi"}]}],
     r"sharegpt\.json: sample 0, conversations\[0\]: 'from' is 'human'; expected 'user' or 'assistant'"),
    ("novalue.json", [{"conversations": [{"from": "user", "value": 3}]}],
     r"novalue\.json: sample 0, conversations\[0\]: 'value' must be a string, got 3"),
    ("dicts.json", [{"text": "hello"}], r"dicts\.json: sample 0: expected a string or an object with a "
                                        r"'conversations' list, got an object with keys 'text'"),
    ("blank.json", ["text", "  "], r"blank\.json: sample 1: empty text"),
    ("none.json", [], r"none\.json: no calibration samples"),
    ("object.json", {"conversations": []}, r"object\.json: expected a JSON list of conversations or strings"),
    ("data.csv", "a,b\n1,2\n", r"data\.csv: calibration data must be a \.json or \.jsonl file .* got a '\.csv' file"),
    ("weights.bin", b"\x00\xff", r"weights\.bin: calibration data must be"),
    ("binary.txt", b"PK\x03\x04\xff\xfe", r"binary\.txt: not UTF-8 text \(byte 4\); is it a binary file\?"),
    ("lines.jsonl", '"ok"\n{bad\n', r"lines\.jsonl: line 2 is not valid JSON"),
])
def test_bad_calibration_data_is_an_error_naming_file_sample_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_calibration(str(path), Tokenizer.from_file())


def test_cli_quantize_bad_data_fails_before_loading_the_model(outlier_ckpt, tmp_path, capsys, monkeypatch):
    from qwenlm import cli
    monkeypatch.setattr(qrun, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([{"conversations": [{"role": "user", "content": "hi"}]}]))
    assert cli.main(["quantize", "--model", str(outlier_ckpt), "--data", str(data), "--out",
                     str(tmp_path / "out")]) == 2
    assert "calib.json: sample 0, conversations[0]: missing 'from'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_reports_calibration_size_removes_stale_partials_and_writes_umask_modes(outlier_ckpt, tmp_path,
                                                                                      capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.incomplete-{dead.pid}"
    running = tmp_path / f".out.incomplete-{os.getppid()}"  # a live process: its run may still be going
    others = [tmp_path / ".out.incomplete-notapid", tmp_path / ".other.incomplete-1", tmp_path / "notes.txt"]
    for d in (stale, running, others[0], others[1]):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    others[2].write_text("mine")
    out = quantize_model(outlier_ckpt, CONVS[:2], 4, 32, tmp_path / "out", max_len=16, progress=True)
    err = capsys.readouterr().err
    assert "calibrating on 2 samples, 32 tokens" in err
    assert f"removed {stale}, the partial output of an earlier run that did not finish (process {dead.pid} is gone)" in err
    assert not stale.exists() and (running / "model.safetensors").exists()
    assert all(p.exists() for p in others) and others[2].read_text() == "mine"
    mode = oct(0o666 & ~files.umask())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.name.endswith("json") or
            p.name == "model.safetensors"} == {n: mode for n in ("config.json", "generation_config.json",
                                                                 "model.safetensors", "quantize_config.json",
                                                                 "tokenizer_config.json")}
