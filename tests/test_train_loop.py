"""The fine-tuning loop on a tiny checkpoint: it learns (full and LoRA), its LoRA step is the step of transformers'
Qwen2ForCausalLM + PEFT on the same weights, its adapters are PEFT's files, the command line writes the output
folder, and every bad setting is an error naming its option."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from qwenlm.cli import main
from qwenlm.model.loader import load_model
from qwenlm.train.labels import IGNORE_TOKEN_ID
from qwenlm.train.loss import causal_lm_loss, training_hidden
from qwenlm.train.optim import decay_groups
from qwenlm.train.trainer import Trainer
from train_helpers import GPTQ_INT4, learnable_checkpoint, small_config, write_conversations


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return learnable_checkpoint(root / "Qwen-tiny-Chat"), write_conversations(root / "train.json"), root


@pytest.fixture(scope="module")
def lora_run(files):
    model, data, root = files
    held_out = write_conversations(root / "eval.json", repeat=1, conversations=[
        [("user", "What is the capital of Italy?"), ("assistant", "Rome.")], [("user", "1+1?"), ("assistant", "2")]])
    trainer = Trainer(small_config(model, data, root / "lora", epochs=10, lora_dropout=0.0,
                                   eval_data=[str(held_out)]))
    trainer.train()
    return trainer


def test_lora_brings_training_loss_down(lora_run):
    losses = [r["loss"] for r in lora_run.history]
    assert len(losses) == 20  # 6 samples of 25-55 tokens -> 2 packs of <= 128 tokens per epoch, 10 epochs
    # from ~19 (the scaled head's random logits) to under 2 mean over the last epoch (measured 1.4): memorised
    assert losses[0] > 15 and sum(losses[-2:]) / 2 < 2.0, losses
    # the official schedule: linear warmup over ceil(0.01 * 20) = 1 step, then cosine from the peak to 0
    lrs = [r["lr"] for r in lora_run.history]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(
        1e-2 * 0.5 * (1 + math.cos(math.pi * 18 / 19)), rel=1e-9)


def test_eval_loss_after_each_epoch(lora_run):
    evals = {r["step"]: r["eval_loss"] for r in lora_run.history if r["eval_loss"] is not None}
    assert sorted(evals) == list(range(2, 21, 2))  # the last step of each of the 10 epochs
    # the last one, recomputed sample by sample with the trained model
    lora_run.model.eval()
    total, items = 0.0, 0
    with torch.no_grad():
        for s in lora_run.eval_samples:
            batch = {"input_ids": torch.tensor([s.input_ids]), "position_ids": torch.arange(len(s.input_ids))[None]}
            labels = torch.tensor([s.labels])
            total += causal_lm_loss(lora_run.model.logits(training_hidden(lora_run.model, batch)), labels, 1).item()
            items += int((labels[:, 1:] != IGNORE_TOKEN_ID).sum())
    assert evals[20] == pytest.approx(total / items, rel=1e-5)
    csv_rows = (lora_run.output / "loss.csv").read_text().splitlines()
    assert csv_rows[2].split(",")[-1] != "" and csv_rows[1].split(",")[-1] == ""


def test_full_brings_training_loss_down_and_writes_a_loadable_folder(files):
    model, data, root = files
    trainer = Trainer(small_config(model, data, root / "full", method="full", epochs=4, lr=2e-3))
    out = trainer.train()
    losses = [r["loss"] for r in trainer.history]
    assert losses[0] > 15 and sum(losses[-2:]) / 2 < 3.0, losses
    loaded = load_model(out, dtype=torch.float32, progress=False)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors", "loss.csv",
            "loss.png"} <= {p.name for p in out.iterdir()}


def test_qlora_on_a_gptq_int4_folder(files):
    """Q-LoRA trains LoRA over the frozen GPTQ Int4 layers; that needs PEFT to know GPTQLinear, which
    qwenlm.train.qlora registers; the GPTQ layers pass gradients to the adapters below them."""
    _, data, root = files
    model = learnable_checkpoint(root / "Qwen-tiny-Chat-Int4", dtype=torch.float16, fp16=True,
                                 quantization_config=GPTQ_INT4)
    cfg = small_config(model, data, root / "qlora", method="qlora", epochs=10, lora_dropout=0.0)
    trainer = Trainer(cfg)
    trainer.train()
    losses = [r["loss"] for r in trainer.history]
    assert losses[0] > 15 and sum(losses[-2:]) / 2 < 2.5, losses
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_adapter_is_what_peft_writes_and_peft_loads_it(lora_run, files):
    from peft import LoraConfig, PeftModel
    out = lora_run.output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    # the names PEFT gives the official model's modules (finetune.py's targets; both c_proj)
    want = {f"base_model.model.transformer.h.{n}.{m}.lora_{ab}.weight" for n in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj") for ab in "AB"}
    assert keys == want
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 16, 0.0)
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"} and not config["modules_to_save"]
    assert config["base_model_name_or_path"] == str(files[0].resolve())

    # PEFT's own loader on a fresh base model gives the trained model's logits. (Its CAUSAL_LM wrapper needs
    # transformers' generation hooks, which this network has not: the task-agnostic PeftModel class loads it.)
    base = load_model(files[0], dtype=torch.float32, progress=False)
    peft_config = LoraConfig.from_pretrained(str(out))
    peft_config.task_type = None
    loaded = PeftModel.from_pretrained(base, str(out), config=peft_config)
    ids = torch.tensor([lora_run.samples[0].input_ids])
    positions = torch.arange(ids.shape[1])[None]
    batch = {"input_ids": ids, "position_ids": positions}
    lora_run.model.eval()
    with torch.no_grad():
        want_logits = lora_run.model.logits(training_hidden(lora_run.model, batch))
        got = loaded.base_model.model.logits(training_hidden(loaded.base_model.model, batch))
    torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-5)
    fresh = load_model(files[0], dtype=torch.float32, progress=False)
    with torch.no_grad():
        plain = fresh.logits(training_hidden(fresh, batch))
    assert (plain - want_logits).abs().max() > 1.0  # the adapter changed the logits


def test_lora_step_equals_transformers_qwen2_with_peft(files):
    """Loss and LoRA gradients of one optimizer step (2 packed micro-batches, official labels) against
    transformers' Qwen2ForCausalLM with PEFT LoRA r 64 / alpha 16 on the mapped weights: c_attn's LoRA is
    q/k/v's LoRAs sharing A (B split in three), w2 -> gate_proj, w1 -> up_proj, mlp.c_proj -> down_proj."""
    from peft import LoraConfig, get_peft_model
    from test_model import to_qwen2
    model, data, root = files
    trainer = Trainer(small_config(model, data, root / "oracle", grad_accum=2, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; random B makes every gradient (A's too) nonzero
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    hf = to_qwen2(load_model(model, dtype=torch.float32, progress=False)).train()
    hf = get_peft_model(hf, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    H = trainer.model.config.hidden_size
    ours = {n.replace(".default", ""): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    theirs = {n.replace(".default", "").replace("base_model.model.", "", 1): p for n, p in hf.named_parameters()
              if "lora_" in n}

    def pairs(i):  # (our LoRA name prefix, rows of our B, their module)
        a, m = f"transformer.h.{i}.attn.", f"transformer.h.{i}.mlp."
        q = f"model.layers.{i}."
        return [(a + "c_attn", slice(0, H), q + "self_attn.q_proj"), (a + "c_attn", slice(H, 2 * H), q + "self_attn.k_proj"),
                (a + "c_attn", slice(2 * H, 3 * H), q + "self_attn.v_proj"), (a + "c_proj", slice(None), q + "self_attn.o_proj"),
                (m + "w2", slice(None), q + "mlp.gate_proj"), (m + "w1", slice(None), q + "mlp.up_proj"),
                (m + "c_proj", slice(None), q + "mlp.down_proj")]

    layers = range(trainer.model.config.num_hidden_layers)
    with torch.no_grad():
        for i in layers:
            for mine, rows, other in pairs(i):
                theirs[other + ".lora_A.weight"].copy_(ours[mine + ".lora_A.weight"])
                theirs[other + ".lora_B.weight"].copy_(ours[mine + ".lora_B.weight"][rows])

    group = trainer.plan[0][1]
    assert len(group) == 2
    loss, _ = trainer.accumulate(group)
    batches = [trainer._collate([trainer.samples[i] for i in mb]) for mb in group]
    n_items = sum(int((b["labels"][:, 1:] != IGNORE_TOKEN_ID).sum()) for b in batches)
    hf_loss = sum(hf(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                     num_items_in_batch=torch.tensor(n_items), use_cache=False).loss for b in batches)
    hf_loss.backward()
    assert loss == pytest.approx(hf_loss.item(), rel=1e-5)
    for i in layers:
        a_grad = {}
        for mine, rows, other in pairs(i):
            torch.testing.assert_close(ours[mine + ".lora_B.weight"].grad[rows], theirs[other + ".lora_B.weight"].grad,
                                       rtol=1e-4, atol=1e-7, msg=other)
            a_grad[mine] = a_grad.get(mine, 0) + theirs[other + ".lora_A.weight"].grad  # shared A: grads add up
        for mine, grad in a_grad.items():
            torch.testing.assert_close(ours[mine + ".lora_A.weight"].grad, grad, rtol=1e-4, atol=1e-7, msg=mine)
    assert all(p.grad.abs().max() > 0 for p in ours.values())


def test_weight_decay_groups_match_transformers_trainer(files):
    from transformers import Trainer as HFTrainer
    model = load_model(files[0], dtype=torch.float32, progress=False).requires_grad_(True)
    decay, no_decay = decay_groups(model, 0.1)
    want = set(HFTrainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == want
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters()} - want
    assert no_decay["weight_decay"] == 0.0 and all(n.endswith("bias") for n in set(names.values()) - want)
    assert "transformer.ln_f.weight" in want  # Qwen's RMSNorm is decayed by the official Trainer too


def test_cli_end_to_end(files, tmp_path, capsys):
    model, data, _ = files
    out = tmp_path / "adapter"
    rc = main(["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--epochs", "1",
               "--max-len", "128", "--grad-accum", "1", "--save-steps", "1", "--no-progress",
               "--labels", "assistant-only", "--no-gradient-checkpointing"])
    assert rc == 0, capsys.readouterr().err
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.csv", "loss.png"} <= {p.name for p in out.iterdir()}
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,tokens,eval_loss" and len(rows) == 1 + 2  # 194 tokens: 2 packs of 128
    assert (out / "checkpoint-1" / "complete.json").is_file() and not (out / "checkpoint-2").exists()  # final: output
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "data: 6 samples" in printed and "estimated peak memory" in printed


@pytest.mark.parametrize("args, option", [
    (["--method", "sft"], "--method"),
    (["--data", "missing.json"], "--data"),
    (["--lr", "-1"], "--lr"),
    (["--max-len", "0"], "--max-len"),
    (["--labels", "all"], "--labels"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--method", "qlora"], "--method"),  # not a GPTQ folder
    (["--method", "full", "--no-train-embeddings"], "--train-embeddings"),
    (["--batch-tokens", "16"], "--batch-tokens"),
    (["--optimizer", "adamw8bit", "--device", "cpu"], "--optimizer"),
])
def test_bad_settings_name_the_option(files, tmp_path, capsys, args, option):
    model, data, _ = files
    base = ["finetune", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and option in err, err


ZERO3 = {  # the official finetune/ds_config_zero3.json, abridged (spec §15)
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}, "overlap_comm": True},
    "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}


def test_official_deepspeed_configs_map_to_sharding(files, tmp_path):
    from qwenlm.train.deepspeed import settings_from_deepspeed
    model, data, _ = files
    zero3 = tmp_path / "ds_config_zero3.json"
    zero3.write_text(json.dumps(ZERO3))
    used, ignored = settings_from_deepspeed(zero3)
    assert used == {"sharding": "fsdp"} and "scheduler" in ignored and "zero_optimization.offload_optimizer" in ignored
    zero2 = tmp_path / "ds_config_zero2.json"
    zero2.write_text(json.dumps({**ZERO3, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = small_config(model, data, tmp_path / "o", deepspeed=str(zero2)).check()
    assert (cfg.sharding, cfg.dtype) == ("ddp", "bf16")
    with pytest.raises(ValueError, match="--deepspeed"):
        small_config(model, data, tmp_path / "o", deepspeed=str(tmp_path / "missing.json")).check()
