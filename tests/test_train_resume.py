"""Checkpoints: a run interrupted after a checkpoint and resumed ends with bit-identical weights to one that ran
through; a process killed while writing a checkpoint leaves nothing that looks complete, and resuming then
still gives the same weights."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenlm.sampling import ParamError
from qwenlm.train import checkpoint as ckpt
from qwenlm.train.trainer import Trainer
from train_helpers import learnable_checkpoint, small_config, write_conversations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # a base (non-chat) folder name: LoRA trains wte / lm_head in full too, so they are checkpointed as well
    return learnable_checkpoint(root / "Qwen-tiny"), write_conversations(root / "train.json"), root


def config(files, name, method="lora", **kw):
    model, data, root = files
    # dropout on: resuming must restore the RNG to draw the same masks
    values = dict(method=method, epochs=2, save_steps=2, lora_dropout=0.1, lr=1e-3)
    return small_config(model, data, root / name, **{**values, **kw})


def final_weights(out: Path, method: str) -> dict:
    return load_file(out / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(files):
    trainer = Trainer(config(files, "through-lora"))
    assert trainer.cfg.embeddings_trained()  # a base model's folder name: wte / lm_head trained too
    return {"lora": (trainer.train(), [r["loss"] for r in trainer.history])}


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_bit_identical_weights(files, uninterrupted):
    # LoRA with wte / lm_head trained in full and dropout on; full fine-tuning's (sharded) resume is in
    # test_train_dist.py
    method = "lora"
    cfg = config(files, f"cut-{method}", method)
    trainer = Trainer(cfg)
    step = trainer.train_step

    def stop_in_step_4(group):  # killed during step 4: steps 1-3 done, checkpoint-2 written, step 3 lost
        if trainer.step == 3:
            raise Interrupted
        return step(group)

    trainer.train_step = stop_in_step_4
    with pytest.raises(Interrupted):
        trainer.train()
    out = Path(cfg.output)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-2"]
    cfg.resume = True
    resumed = Trainer(cfg)
    resumed.train()
    assert resumed.history[2]["step"] == 3 and len(resumed.history) == 4
    want_dir, want_losses = uninterrupted[method]
    want, got = final_weights(want_dir, method), final_weights(out, method)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert [r["loss"] for r in resumed.history] == want_losses
    # and the adapter did train: a wrong resume that replays nothing would differ from the base
    assert want_losses[-1] < want_losses[0]


def test_a_fresh_run_does_not_write_over_checkpoints(files, uninterrupted):
    with pytest.raises(ParamError, match="--resume"):
        Trainer(config(files, "through-lora"))


def test_resume_with_other_settings_names_the_option(files, uninterrupted):
    cfg = config(files, "through-lora", lr=2e-3)
    cfg.resume = True
    with pytest.raises(ParamError, match="--lr"):
        Trainer(cfg).train()


KILLED_RUN = """
import json, sys, time
from qwenlm.train import checkpoint as ckpt
from qwenlm.train.config import FinetuneConfig
from qwenlm.train.trainer import finetune
save_rng = ckpt.save_rng
def slow_save_rng(path):  # the checkpoint of step 2 half written: weights and optimizer state, no RNG, no marker
    if ".checkpoint-2.tmp" in str(path):
        print("WRITING", flush=True)
        time.sleep(120)
    save_rng(path)
ckpt.save_rng = slow_save_rng
finetune(FinetuneConfig(**json.loads(sys.argv[1])))
"""


def test_kill_9_during_a_checkpoint_write(files, uninterrupted):
    cfg = config(files, "killed")
    values = {**cfg.to_dict(), "save_steps": 1}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(values)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WRITING"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    out = Path(cfg.output)
    tmp = out / ".checkpoint-2.tmp"
    assert (tmp / "trainable.safetensors").is_file() and not (tmp / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "adapter_model.safetensors").exists()  # the output folder gets the adapter only at the end

    cfg.resume = True
    Trainer(cfg).train()
    assert not tmp.exists()  # the next checkpoint cleared the half-written one
    want = final_weights(uninterrupted["lora"][0], "lora")
    got = final_weights(out, "lora")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_only_named_and_marked_folders_count(tmp_path):
    def write(folder):
        (folder / "trainable.safetensors").write_bytes(b"x")

    first = ckpt.save_checkpoint(tmp_path, 3, write)
    assert ckpt.is_complete(first) and json.loads((first / ckpt.MARKER).read_text()) == {"step": 3}
    (tmp_path / "checkpoint-7").mkdir()  # renamed by hand, no marker
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / ckpt.MARKER).write_text('{"step": 8}')  # a marker of another step
    (tmp_path / ".checkpoint-11.tmp").mkdir()
    (tmp_path / ".checkpoint-11.tmp" / ckpt.MARKER).write_text('{"step": 11}')  # never renamed
    assert ckpt.latest_checkpoint(tmp_path) == first

    def fail(folder):
        write(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 12, fail)
    assert not (tmp_path / "checkpoint-12").exists() and not (tmp_path / ".checkpoint-12.tmp").exists()
    assert not (tmp_path / ".checkpoint-11.tmp").exists()  # a save clears what a killed save left
    assert ckpt.latest_checkpoint(tmp_path) == first
