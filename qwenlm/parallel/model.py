"""A tensor-parallel Qwen model for one rank: the network of `qwenlm.model.qwen` with every split tensor at its
rank's size (`TPPlan`), the collectives of `qwenlm.parallel.layers` added, and only the rank's slices read from the
checkpoint files (safetensors slices; a .bin file is memory-mapped, so its other slices are not read either).

The process group must be initialised first (gloo on CPU, NCCL on GPUs): `torch.distributed.init_process_group`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from qwenlm.config import ModelConfig
from qwenlm.model import quant
from qwenlm.model.loader import CheckpointError, _assign, build_model, fill_model, read_config
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.parallel.layers import VocabParallelEmbedding, all_reduce_output, gather_output
from qwenlm.parallel.tp import TPError, TPPlan


def check_gpus(local_world: int) -> None:
    """Startup: this host shows at least `local_world` GPUs (its share of the ranks: LOCAL_WORLD_SIZE under
    torchrun), else a TPError saying how many are visible and through which CUDA_VISIBLE_DEVICES."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < local_world:
        raise TPError(f"tensor parallelism needs {local_world} GPUs on this host, {visible} visible "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def build_tp_model(cfg: ModelConfig, rank: int, world: int, group=None) -> QWenLMHeadModel:
    """Rank `rank`'s model on the meta device: local shapes, collectives in place; fill it by name (`load_tp_model`)."""
    plan = TPPlan(cfg, world)
    if not 0 <= rank < world:
        raise TPError(f"rank {rank} is not in 0..{world - 1}")
    model = build_model(cfg, "meta")
    for name, t in model.state_dict().items():  # meta tensors: the plan's slicing gives the local shapes
        _assign(model, name, plan.shard(name, t, rank))
    for block in model.transformer.h:
        block.attn.num_heads = plan.heads
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj):
            if isinstance(lin, quant.GPTQLinear):
                lin.in_features, lin.out_features = lin.g_idx.shape[0], lin.scales.shape[1]
            else:
                lin.out_features, lin.in_features = lin.weight.shape
        all_reduce_output(block.attn.c_proj, group)
        all_reduce_output(block.mlp.c_proj, group)
    rows = plan.vocab[rank]
    model.transformer.wte = VocabParallelEmbedding(rows, cfg.hidden_size, rank * rows, group, device="meta")
    model.lm_head.out_features = rows
    gather_output(model.lm_head, group)
    model.tp_rank, model.tp_world, model.tp_plan = rank, world, plan  # config keeps the whole model's numbers
    return model


def load_tp_model(folder: str | Path, rank: int | None = None, world: int | None = None, device="cpu",
                  dtype: torch.dtype | None = None, group=None, progress: bool = True) -> QWenLMHeadModel:
    """Rank `rank` of `world` (default: this process's rank and the group's size) from a checkpoint folder."""
    folder, cfg = read_config(folder)
    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    device = torch.device(device)
    if device.type == "cuda":
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    dtype = dtype or cfg.auto_dtype(device)
    model = build_tp_model(cfg, rank, world, group)
    plan = model.tp_plan
    whole = {name: tuple(t.shape) for name, t in build_model(cfg, "meta").state_dict().items()}

    def take(name, source):
        shape = tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())
        if shape != whole[name]:
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {shape}, config.json implies {whole[name]}")
        return plan.shard(name, source, rank)

    return fill_model(model, folder, device, dtype, progress, take, label=f" (rank {rank} of {world})")
