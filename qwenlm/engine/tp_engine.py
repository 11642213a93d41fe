"""How a tensor-parallel engine's model comes up on rank 0: the startup checks, then rank 0's slice with its
workers — spawned on this host (`tp_workers.TPWorkers`) or a launcher's ranks (`tp_launch`, torchrun)."""

from __future__ import annotations

from pathlib import Path

import torch

from qwenlm.engine import tp_launch
from qwenlm.engine.tp_launch import check_launch, launched, launched_device
from qwenlm.engine.tp_workers import TPWorkers
from qwenlm.model.loader import read_config
from qwenlm.parallel.model import check_gpus, load_tp_model
from qwenlm.parallel.tp import TPError, TPPlan


def check_tp_fit(folder: str | Path, world: int, device) -> torch.device:
    """Startup: the folder's model splits over `world` ranks (`TPPlan`: the head count and vocabulary divide) and,
    on CUDA, this host shows `world` GPUs; a TPError naming the field or the GPU count otherwise. Reads only
    config.json, so `qwenlm serve` checks this before its engine process starts. Returns rank 0's device."""
    _, cfg = read_config(folder)
    TPPlan(cfg, world)
    check_launch(world)
    device = torch.device(device)
    if launched():
        return launched_device(device)
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise TPError(f"device {device}: with tensor parallelism rank r runs on cuda:r (rank 0 in this process on "
                          "cuda:0); pick the GPUs with CUDA_VISIBLE_DEVICES")
        check_gpus(world)
        device = torch.device("cuda", 0)
    return device


def load_tp_engine_model(folder: str | Path, world: int, device, dtype: torch.dtype | None, progress: bool = True):
    """Rank 0's slice of a folder's model, its workers started and joined (`model.tp_workers`, which the engine's
    runner drives). The split and the GPUs are checked before any process starts. Under a launcher (torchrun,
    `tp_launch`) nothing is spawned: RANK 0 returns its slice as here, every other rank follows rank 0's steps and
    then exits its process."""
    device, folder = check_tp_fit(folder, world, device), Path(folder)
    if tp_launch.launched() and tp_launch.launched_rank() > 0:
        tp_launch.follow_launched(folder, world, device, dtype)  # never returns
    if device.type == "cuda":
        torch.cuda.set_device(device)
    workers = tp_launch.LaunchedRanks(folder, world, device) if tp_launch.launched() else \
        TPWorkers(folder, world, device, dtype)
    try:
        model = load_tp_model(folder, 0, world, device, dtype, progress=progress)
        workers.wait_ready()
    except BaseException:
        workers._abort()
        raise
    model.tp_workers = workers
    return model
