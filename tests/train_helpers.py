"""What the fine-tuning tests share: a tiny checkpoint that can learn, a few conversations, a small config."""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from qwenlm.testing import make_tiny_checkpoint
from qwenlm.train.config import FinetuneConfig

CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")],
    [("user", "Name a colour."), ("assistant", "Blue.")],
]


def learnable_checkpoint(folder: Path, **overrides) -> Path:
    """The tiny random checkpoint with lm_head scaled 25x. With the official init (std 0.02) a 64-wide model's
    logits stay under ~1.5 whatever its blocks compute, so adapters on the blocks could never make it
    confident; scaled, a few steps of LoRA memorise a conversation."""
    out = make_tiny_checkpoint(folder, **overrides)
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] *= 25  # kept in its stored dtype
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


GPTQ_INT4 = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
             "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
             "quant_method": "gptq"}  # the official Int4 releases' quantization_config, with groups the tiny width fits


def write_conversations(path: Path, repeat: int = 2, conversations=CONVERSATIONS) -> Path:
    data = [{"id": f"identity_{i}", "conversations": [{"from": r, "value": v} for r, v in c]}
            for i, c in enumerate(conversations * repeat)]
    path.write_text(json.dumps(data))
    return path


def small_config(model: Path, data: Path, output: Path, **overrides) -> FinetuneConfig:
    """A run of a few seconds: 128-token packs, one pack per step, no warmup rounding surprises."""
    values = dict(model=str(model), data=[str(data)], output=str(output), max_len=128, batch_tokens=128,
                  grad_accum=1, epochs=2, lr=1e-2, gradient_checkpointing=False, progress=False)
    return FinetuneConfig(**{**values, **overrides})
