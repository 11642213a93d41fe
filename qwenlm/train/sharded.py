"""FSDP2 state in and out: sharded checkpoints through torch.distributed.checkpoint (each process writes and reads
its own shards, in parallel, and a checkpoint loads on another number of processes), and the full state gathered
on the main process for the output folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_PREFIX = "model."  # the trainer's LossModule holds the network as .model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Trainable weights and optimizer state, every process its shards (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(module, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(module, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())


def full_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (or the trainable) state on the CPU of the main process, with the network's own names; the
    other processes get an empty dict. A collective call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(module, options=options)
    return {k.removeprefix(_PREFIX): v for k, v in state.items()}
