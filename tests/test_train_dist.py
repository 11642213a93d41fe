"""Two processes (torchrun, gloo on the CPU) train as one: DDP for LoRA, FSDP2 for full fine-tuning with sharded
checkpoints (torch.distributed.checkpoint) that a resumed run continues from."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenlm.train import checkpoint as ckpt
from qwenlm.train.trainer import Trainer
from train_helpers import learnable_checkpoint, small_config, write_conversations

ROOT = Path(__file__).resolve().parent.parent

TWO_PROCESSES = """
import json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from qwenlm.train.config import FinetuneConfig
from qwenlm.train.trainer import finetune
dist.init_process_group("gloo")
lora, full = json.loads(sys.argv[1])
finetune(FinetuneConfig(**lora))
finetune(FinetuneConfig(**full))
# resume the full run from its sharded checkpoint of step 1, in another folder
resumed = dict(full, output=full["output"] + "-resumed", resume=True)
if dist.get_rank() == 0:
    Path(resumed["output"]).mkdir()
    shutil.copytree(Path(full["output"]) / "checkpoint-1", Path(resumed["output"]) / "checkpoint-1")
dist.barrier()
finetune(FinetuneConfig(**resumed))
finetune(FinetuneConfig(**dict(lora, output=lora["output"] + "-fsdp", sharding="fsdp")))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 9 samples: 3 packs of <= 128 tokens per epoch, so with 2 micro-batches per step (one on each process, or
    # both on the one) each epoch ends with a step of one: the second process then runs a zero-weight repeat
    model, data = learnable_checkpoint(root / "Qwen-tiny-Chat"), write_conversations(root / "train.json", repeat=3)
    configs = {method: lambda out, m=method: small_config(model, data, out, method=m, grad_accum=2, save_steps=1,
                                                          lr=1e-3, lora_dropout=0.0)
               for method in ("lora", "full")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = root / "two.py"
    script.write_text(TWO_PROCESSES)
    args = json.dumps([configs[m](root / f"{m}-2").to_dict() for m in ("lora", "full")])
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = {}
    for method in ("lora", "full"):  # meanwhile, the same runs in this one process
        trainer = Trainer(configs[method](root / f"{method}-1"))
        single[method] = (trainer.train(), trainer)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    return root, single, out


def weights(folder: Path, method: str) -> dict:
    return load_file(folder / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_as_one(runs, method):
    root, single, log = runs
    assert f"2 process(es) ({'ddp' if method == 'lora' else 'fsdp'}) on cpu" in log
    one, two = weights(single[method][0], method), weights(root / f"{method}-2", method)
    assert set(one) == set(two)
    # the same sums in another order: fp32 rounding only. Adam's first steps move each weight by about lr
    # (1e-3) in the direction of its gradient, so processes training the wrong micro-batches (the same one,
    # or each all of them) would differ by far more than this; the loss curve checks the token averaging
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-6, msg=name)
    curve_one = (single[method][0] / "loss.csv").read_text().splitlines()
    curve_two = (root / f"{method}-2" / "loss.csv").read_text().splitlines()
    assert len(curve_one) == len(curve_two) == 1 + 4
    for a, b in zip(curve_one[1:], curve_two[1:]):
        assert float(a.split(",")[2]) == pytest.approx(float(b.split(",")[2]), rel=1e-5)


def test_lora_under_fsdp_writes_the_same_adapter(runs):
    root, single, log = runs
    assert "2 process(es) (fsdp)" in log
    one, two = weights(single["lora"][0], "lora"), weights(root / "lora-2-fsdp", "lora")
    assert set(one) == set(two)  # PEFT's names, from the gathered shards
    config = [json.loads((d / "adapter_config.json").read_text()) for d in (single["lora"][0], root / "lora-2-fsdp")]
    for c in config:  # PEFT keeps them as a set: written in any order
        c["target_modules"] = sorted(c["target_modules"])
    assert config[0] == config[1]
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-6, msg=name)


def test_sharded_checkpoint_resumes_to_the_same_weights(runs):
    root, single, _ = runs
    sharded = root / "full-2" / "checkpoint-1" / "sharded"
    assert ckpt.is_complete(root / "full-2" / "checkpoint-1") and list(sharded.glob("*.distcp"))
    assert not (root / "full-2" / "checkpoint-1" / "trainable.safetensors").exists()
    one, resumed = weights(single["full"][0], "full"), weights(root / "full-2-resumed", "full")
    for name in one:
        torch.testing.assert_close(resumed[name], one[name], rtol=1e-4, atol=2e-6, msg=name)
