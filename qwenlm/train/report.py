"""What a user sees of a training run: the memory estimate before it, memory in use during, the loss curve after."""

from __future__ import annotations

import csv
import io
import resource
from pathlib import Path

import torch

from qwenlm.config import ModelConfig
from qwenlm.files import atomic_path, write_text

CURVE_FIELDS = ("step", "epoch", "loss", "lr", "tokens", "eval_loss")


def estimate_memory_gb(cfg: ModelConfig, method: str, dtype: torch.dtype, trainable: int, tokens: int,
                       optimizer: str, checkpointing: bool, world: int = 1, sharded: bool = False) -> float:
    """A rough peak for one process: weights, gradients and optimizer state of the trainable parameters, and the
    activations of one micro-batch of `tokens` tokens. The activation term counts the tensors autograd keeps per
    block (the block inputs only, with gradient checkpointing, plus one block recomputed) and the fp32 logits
    and their gradient; kernels' workspaces and the allocator's slack come on top."""
    H, L, F, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim, cfg.vocab_size
    width = torch.finfo(dtype).bits // 8
    params = V * H * 2 + L * (4 * H * H + 3 * H * F)
    weights = params * (0.5 if method == "qlora" else width)
    state_bytes = {"adamw8bit": 2, "adamw": 8}[optimizer]  # two moments per trainable parameter
    grad_bytes = width if method == "full" else 4  # adapters are fp32
    train = trainable * (grad_bytes + state_bytes + (0 if method == "full" else 4))
    if sharded:
        weights, train = weights / world, train / world
    per_block = tokens * (10 * H + 4 * F) * width  # q, k, v, attention out, norms, MLP branches
    acts = tokens * H * width * L + per_block if checkpointing else per_block * L
    logits = tokens * V * 4 * 2
    return (weights + train + acts + logits) / 1e9


def memory_in_use_gb(device: torch.device) -> float:
    """CUDA: peak allocated by torch so far; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def write_curve(rows: list[dict], output: Path) -> tuple[Path, Path | None]:
    """loss.csv (one row per optimizer step; eval_loss where an eval ran) and loss.png beside it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") if r.get(k) is not None else "" for k in CURVE_FIELDS})
    csv_path = output / "loss.csv"
    write_text(csv_path, buf.getvalue())
    return csv_path, plot_curve(rows, output / "loss.png")


def plot_curve(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
