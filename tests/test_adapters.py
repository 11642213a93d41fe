"""LoRA adapters written by PEFT itself (the official LoraConfig) merge into our model with PEFT's logits,
through `load_adapter`, `qwenlm.load(adapter=...)` and `qwenlm merge`, whose folder `qwenlm quantize` takes;
every bad adapter gets an error naming the file and field."""

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenlm
from qwenlm import cli
from qwenlm.adapters import AdapterError, load_adapter
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import DenseKVCache

OFFICIAL = dict(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn", "c_proj", "w1", "w2"])
IDS = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 13, 151644, 872, 198]])


def logits(model, ids=IDS):
    ctx = DenseKVCache(model.config.num_hidden_layers)
    ctx.begin(torch.ones_like(ids, dtype=torch.bool))
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        return model.logits(model(ids, pos, ctx, model.inv_freq([1.0], "cpu")))


def peft_adapter(base, out, **config):
    """An adapter saved by PEFT from our model (the official LoraConfig unless told), lora_B (zero at PEFT's
    init) and any modules_to_save copies randomised; returns PEFT's logits (the oracle: the unmerged adapter
    in eval mode)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(load_model(base, progress=False), peft.LoraConfig(**{**OFFICIAL, **config}))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "modules_to_save" in name:
                p.add_(0.02 * torch.randn_like(p))
    pm.save_pretrained(str(out))
    pm.eval()
    return logits(pm.base_model.model)


@pytest.fixture(scope="module")
def chat_adapter(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "chat-lora"
    return out, peft_adapter(tiny_ckpt, out)


@pytest.fixture(scope="module")
def base_adapter(tiny_ckpt, tmp_path_factory):
    """The official base-model LoRA: wte and lm_head trained whole (modules_to_save)."""
    out = tmp_path_factory.mktemp("adapters") / "base-lora"
    return out, peft_adapter(tiny_ckpt, out, modules_to_save=["wte", "lm_head"])


def test_peft_file_format(chat_adapter):
    folder, _ = chat_adapter
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 5 * 2  # A and B, 5 linears per block (both c_proj), 2 blocks


@pytest.mark.parametrize("which", ["chat_adapter", "base_adapter"])
def test_load_adapter_gives_peft_logits(tiny_ckpt, which, request):
    folder, want = request.getfixturevalue(which)
    model = load_model(tiny_ckpt, progress=False)
    before = logits(model)
    adapter = load_adapter(model, folder)
    assert adapter.scale == 16 / 64
    got = logits(model)
    assert (got - before).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [dict(target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.w2)"),
                                    dict(target_modules=["c_attn", "w1"], layers_to_transform=[1]),
                                    dict(target_modules=["c_proj"], exclude_modules=["attn.c_proj"], use_rslora=True)])
def test_peft_target_rules(tiny_ckpt, tmp_path, config):
    """PEFT's ways of choosing modules (a regex, layers_to_transform, exclude_modules) and rsLoRA scaling."""
    want = peft_adapter(tiny_ckpt, tmp_path, **config)
    model = load_model(tiny_ckpt, progress=False)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-5)


def test_bin_adapter_and_qwenlm_load(tiny_ckpt, base_adapter, tmp_path):
    folder, want = base_adapter
    shutil.copy(folder / "adapter_config.json", tmp_path / "adapter_config.json")
    torch.save(load_file(str(folder / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False, adapter=str(tmp_path))
    torch.testing.assert_close(logits(llm.model), want, rtol=1e-4, atol=1e-5)
    args = cli.build_parser().parse_args(["generate", "Hi", "--model", str(tiny_ckpt), "--device", "cpu",
                                          "--adapter", str(tmp_path)])
    torch.testing.assert_close(logits(cli._load(args).model), want, rtol=1e-4, atol=1e-5)


def test_merge_writes_official_folder_that_loads_and_quantizes(tiny_ckpt, base_adapter, tmp_path, capsys,
                                                                monkeypatch):
    from qwenlm import merge
    folder, want = base_adapter
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 30 * 1024 ** 2)  # wte and lm_head are 39 MB each: 3 shards
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(tiny_ckpt), "--adapter", str(folder), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                     "model.safetensors.index.json", "qwen.tiktoken", "tokenizer_config.json"]
    assert (out / "config.json").read_bytes() == (tiny_ckpt / "config.json").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_model(tiny_ckpt, progress=False).state_dict())
    assert not list(tmp_path.glob(".merged.incomplete-*"))
    merged = qwenlm.load(str(out), device="cpu", progress=False)
    torch.testing.assert_close(logits(merged.model), want, rtol=1e-4, atol=1e-5)

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(f"word{i * 7 + j}" for j in range(40)) for i in range(4)))
    q = tmp_path / "merged-Int4"
    assert cli.main(["quantize", "--model", str(out), "--data", str(calib), "--bits", "4", "--group-size", "32",
                     "--out", str(q)]) == 0
    int4 = qwenlm.load(str(q), device="cpu", progress=False)
    got = logits(int4.model)
    base = logits(load_model(tiny_ckpt, progress=False))
    assert (got - want).abs().max() < 0.25 * (got - base).abs().max()  # Int4 of the merged weights, not the base
    with pytest.raises(AdapterError, match="GPTQ-quantized.*qwenlm merge --base.*qwenlm quantize"):
        load_adapter(int4.model, folder)
    assert cli.main(["merge", "--base", str(q), "--adapter", str(folder), "--out", str(tmp_path / "m2")]) == 2
    assert "cannot be merged into Int4/Int8 weights" in capsys.readouterr().err


def test_failed_merge_leaves_nothing(tiny_ckpt, chat_adapter, tmp_path, capsys, monkeypatch):
    from qwenlm import merge

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(merge, "save_safetensors", disk_full)
    argv = ["merge", "--base", str(tiny_ckpt), "--adapter", str(chat_adapter[0]), "--out", str(tmp_path / "m")]
    assert cli.main(argv) == 2
    assert f"qwenlm merge: failed (OSError: disk full); nothing was written to {tmp_path / 'm'}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m").mkdir()
    assert cli.main(argv) == 2 and "already exists; choose a new --out" in capsys.readouterr().err


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


P = "base_model.model.transformer.h.0.attn.c_attn."
BAD = {
    "no folder": (lambda f: shutil.rmtree(f), "adapter folder not found"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter weights"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "adapter_config.json: not valid JSON"),
    "not lora": (lambda f: _edit_config(f, peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'"),
    "bad alpha": (lambda f: _edit_config(f, lora_alpha="16"), "lora_alpha must be a positive number"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "use_dora=True is not supported"),
    "r mismatch": (lambda f: _edit_config(f, r=32), "c_attn has lora_A .64, 64. and lora_B .192, 64.; "
                                                    "adapter_config.json says r=32"),
    "targets mismatch": (lambda f: _edit_config(f, target_modules=["c_attn"]),
                         "transformer.h.0.attn.c_proj has LoRA weights but adapter_config.json target_modules"),
    "target names nothing": (lambda f: _edit_config(f, target_modules=["c_attn", "c_proj", "w1", "w2", "q_proj"]),
                             "target_modules entry 'q_proj' names no module of this model"),
    "key for no module": (lambda f: _edit_tensors(f, lambda s: s.update(
        {k.replace(".h.0.", ".h.7."): s.pop(k) for k in [P + "lora_A.weight", P + "lora_B.weight"]})),
        "transformer.h.7.attn.c_attn matches no linear layer of this model"),
    "missing module": (lambda f: _edit_tensors(f, lambda s: [s.pop(P + "lora_A.weight"), s.pop(P + "lora_B.weight")]),
                       "no LoRA weights for transformer.h.0.attn.c_attn, which target_modules"),
    "missing B": (lambda f: _edit_tensors(f, lambda s: s.pop(P + "lora_B.weight")),
                  "c_attn has lora_A but no lora_B"),
    "wrong in_features": (lambda f: _edit_tensors(f, lambda s: s.update(
        {P + "lora_A.weight": torch.zeros(64, 32)})), "the model's layer is 64 -> 192"),
    "not peft keys": (lambda f: _edit_tensors(f, lambda s: s.update(
        {k.removeprefix("base_model.model."): s.pop(k) for k in list(s)})), "is not in PEFT's format"),
    "stray tensor": (lambda f: _edit_tensors(f, lambda s: s.update(
        {"base_model.model.transformer.ln_f.weight": torch.ones(64)})), "neither a LoRA weight nor part of a module"),
    "corrupt weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 20),
                        "cannot read the adapter weights"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_errors_leave_the_model_unchanged(tiny_ckpt, chat_adapter, tmp_path, case):
    folder = tmp_path / "adapter"
    shutil.copytree(chat_adapter[0], folder)
    breaker, message = BAD[case]
    breaker(folder)
    model = load_model(tiny_ckpt, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_modules_to_save_shape_mismatch(tiny_ckpt, base_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(base_adapter[0], folder)
    _edit_tensors(folder, lambda s: s.update({"base_model.model.lm_head.weight": torch.zeros(1000, 64)}))
    with pytest.raises(AdapterError, match=r"'lm_head.weight' has shape \(1000, 64\), the model's is \(151936, 64\)"):
        load_adapter(load_model(tiny_ckpt, progress=False), folder)


def test_cli_bad_adapter_fails_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import qwenlm.loading
    monkeypatch.setattr(qwenlm.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv in (["generate", "Hi", "--model", str(tiny_ckpt)], ["chat", "--model", str(tiny_ckpt)],
                 ["merge", "--base", str(tiny_ckpt), "--out", str(tmp_path / "m")]):
        assert cli.main(argv + ["--adapter", str(tmp_path / "nope")]) == 2
        assert f"{tmp_path / 'nope'}: adapter folder not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    args = cli.build_parser().parse_args(["serve", "--adapter", "A"])
    assert args.adapter == "A"
