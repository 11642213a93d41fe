"""Checkpoint folders: model.safetensors, sharded safetensors + index, pytorch_model*.bin (+ index), GPTQ tensors.

The network is built on the meta device and every tensor is streamed from its file straight to the target
device and dtype, so no second full copy of the weights ever sits in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from qwenlm.config import ConfigError, ModelConfig
from qwenlm.model.qwen import QWenLMHeadModel

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder, file or tensor is missing or wrong; the message names which."""


# Buffers of the official code that are never in our state dict (spec §2): ignored if a file has them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias", ".logn_tensor")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the order its index (or name) gives."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e!r})") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: listed in {index.name} but missing")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model*.bin found")


def _iter_tensors(path: Path, take=None):
    """Yield (name, getter) for one weight file; getter() reads the tensor, or with `take` returns
    take(name, source) where source is a safetensors slice (indexing it reads only that part) or a
    memory-mapped tensor."""
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            names = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None

        def get(name):
            try:
                return f.get_tensor(name) if take is None else take(name, f.get_slice(name))
            except CheckpointError:
                raise
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read (truncated or corrupt?): {e}") from None

        for name in names:
            yield name, lambda name=name: get(name)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle/zip
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from None
        for name in list(state):
            yield name, lambda name=name: state[name] if take is None else take(name, state[name])


def build_model(cfg: ModelConfig, device="meta") -> QWenLMHeadModel:
    with torch.device(device):
        model = QWenLMHeadModel(cfg)
    if cfg.quantization_config:
        from qwenlm.model import quant
        quant.prepare_gptq(model, cfg.quantization_config)
    return model


def read_config(folder: str | Path) -> tuple[Path, ModelConfig]:
    """A checkpoint folder and its config.json, or a CheckpointError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    try:
        return folder, ModelConfig.from_file(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               progress: bool = True) -> QWenLMHeadModel:
    folder, cfg = read_config(folder)
    device = torch.device(device)
    dtype = dtype or cfg.auto_dtype(device)
    return fill_model(build_model(cfg), folder, device, dtype, progress)


def fill_model(model: QWenLMHeadModel, folder: Path, device: torch.device, dtype: torch.dtype, progress: bool = True,
               take=None, label: str = "") -> QWenLMHeadModel:
    """Every tensor of the folder's files into `model` (built on meta) by name, checked against its shape, on
    `device` in `dtype` (packed ints stay ints); then GPTQ layers finalized, eval mode. take(name, source): the part
    of each tensor to keep (a tensor-parallel rank's slice; see `_iter_tensors`), default the whole tensor."""
    cfg = model.config
    expected = {name: t for name, t in model.state_dict().items()}
    files = checkpoint_files(folder)
    loaded: set[str] = set()
    bar = tqdm(total=len(expected), desc=f"Loading {folder.name}{label}", unit="tensor", disable=not progress)
    for path in files:
        for name, get in _iter_tensors(path, take):
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of a Qwen v1 model "
                                      f"with this config.json)")
            tensor = get()
            want = expected[name]
            if tuple(tensor.shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}{label and ' here'}, "
                                      f"config.json implies {tuple(want.shape)}{label}")
            target_dtype = dtype if want.dtype.is_floating_point else want.dtype  # packed ints stay ints
            _assign(model, name, tensor.to(device=device, dtype=target_dtype))
            loaded.add(name)
            bar.update(1)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} missing from the checkpoint{more}")
    if cfg.quantization_config:
        from qwenlm.model import quant
        quant.finalize(model, device, dtype)
    model.eval()
    model.dtype = dtype
    return model


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value
