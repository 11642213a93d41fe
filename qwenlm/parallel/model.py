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
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from qwenlm.config import ConfigError, ModelConfig
from qwenlm.model import quant
from qwenlm.model.loader import _IGNORED_SUFFIXES, CheckpointError, _assign, build_model, checkpoint_files
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
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    try:
        cfg = ModelConfig.from_file(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    device = torch.device(device)
    if device.type == "cuda":
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    dtype = dtype or cfg.auto_dtype(device)
    model = build_tp_model(cfg, rank, world, group)
    plan = TPPlan(cfg, world)
    expected = model.state_dict()
    loaded: set[str] = set()
    bar = tqdm(total=len(expected), desc=f"Loading {folder.name} (rank {rank}/{world})", unit="tensor",
               disable=not progress)
    for path in checkpoint_files(folder):
        for name, whole in _sliceable_tensors(path):
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of a Qwen v1 model "
                                      f"with this config.json)")
            full_shape = tuple(whole.shape) if isinstance(whole, torch.Tensor) else tuple(whole.get_shape())
            want = expected[name]
            try:
                tensor = plan.shard(name, whole, rank)
            except (RuntimeError, IndexError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name!r} of shape {full_shape} cannot be split: {e}") from None
            if tuple(tensor.shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {full_shape}, which does not give rank "
                                      f"{rank}'s {tuple(want.shape)} of the model config.json describes")
            target = dtype if want.dtype.is_floating_point else want.dtype
            _assign(model, name, tensor.to(device=device, dtype=target))
            loaded.add(name)
            bar.update(1)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} missing from the checkpoint{more}")
    if cfg.quantization_config:
        quant.finalize(model, device, dtype)
    model.eval()
    model.dtype = dtype
    return model


def _sliceable_tensors(path: Path):
    """(name, tensor or safetensors slice) of one weight file; a slice reads only the part indexed."""
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            for name in f.keys():
                yield name, f.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        return
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from None
    yield from state.items()
