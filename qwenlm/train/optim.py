"""The optimizer and learning-rate schedule of the official recipe (spec §15), applied as written.

- AdamW, betas (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0 (by the caller).
- Weight decay on the parameters transformers' Trainer decays: `Trainer.get_decay_parameter_names` leaves
  out nn.LayerNorm weights and names matching bias / layernorm / rmsnorm / norm. Qwen's RMSNorm is its own
  class named ln_1 / ln_2 / ln_f, so in the official runs only biases escape decay; the norms are decayed
  too, and so it is here (tests check this against transformers' own function).
- Cosine decay to 0 after a linear warmup of ceil(warmup_ratio * steps) steps: transformers'
  `get_cosine_schedule_with_warmup`, the function the official Trainer calls. The official DeepSpeed
  configs (ds_config_zero2/3.json) declare a `WarmupLR` scheduler with "auto" values, and DeepSpeed's
  scheduler then takes the place of the Trainer's: the learning rate warms up and stays constant, and
  `--lr_scheduler_type cosine` silently has no effect. That is not copied here; the cosine runs.
- `adamw8bit`: torchao's AdamW8bit (block-wise 8-bit moments: 2 bytes of state per parameter instead of
  8), with stochastic rounding when the weights are bf16, so updates far smaller than a bf16 step are not
  lost: this is what lets full fine-tuning of 7B fit one 80 GB GPU. CUDA only.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from qwenlm.sampling import ParamError

# transformers.Trainer.get_decay_parameter_names (v4.32 excluded "bias" and nn.LayerNorm; later versions
# added the norm-name patterns, none of which matches Qwen's names)
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, and biases / LayerNorm (no decay)."""
    no_decay = {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                for p, _ in m.named_parameters(recurse=False)}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if name in no_decay or _NO_DECAY_NAMES.search(name) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def resolve_optimizer(name: str, method: str, device: torch.device) -> str:
    """auto: 8-bit AdamW for full fine-tuning on CUDA where torchao is installed, else torch's AdamW. Plain AdamW
    on bf16 weights rounds every update to bf16 (updates under ~1/256 of a weight are lost): full fine-tuning
    in bf16 wants the 8-bit optimizer's stochastic rounding, or fp32 weights."""
    if name != "auto":
        return name
    if method == "full" and device.type == "cuda":
        import importlib.util
        if importlib.util.find_spec("torchao") is not None:
            return "adamw8bit"
    return "adamw"


def build_optimizer(model: nn.Module, name: str, lr: float, betas, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    groups = decay_groups(model, weight_decay)
    if not groups:
        raise ValueError("nothing to train: the model has no parameter with requires_grad")
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ParamError("optimizer", f"--optimizer adamw8bit: torchao's 8-bit AdamW runs on CUDA only, and "
                                          f"this run is on {device}; use --optimizer adamw")
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ParamError("optimizer", "--optimizer adamw8bit needs torchao (pip install torchao)") from None
        bf16 = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
        return AdamW8bit(groups, lr=lr, betas=tuple(betas), bf16_stochastic_round=bf16)
    # fused on CUDA: one kernel per step rather than one per parameter tensor; foreach on the CPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type == "cuda" or None)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """TrainingArguments.get_warmup_steps: ceil(ratio * steps)."""
    return math.ceil(total_steps * warmup_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_cosine_schedule_with_warmup
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(total_steps, warmup_ratio), total_steps)
