"""Loading a checkpoint folder: the one path shared by `qwenlm.load` (api.py) and `LLM(path)` (engine.py).

It sits below both so neither imports the other: api.py builds on the engine, and the engine needs only this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlm.adapters import load_adapter, read_adapter_config
from qwenlm.config import GenerationConfig
from qwenlm.hub import DEFAULT_MODEL, resolve_model
from qwenlm.model import quant
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.sampling import ParamError
from qwenlm.tokenizer import Tokenizer

_DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ParamError("dtype", f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def check_device(device: str | torch.device | None) -> None:
    """The device asked for exists on this machine: checked before anything loads, so a typo or a missing GPU
    is one clear error rather than a failure minutes into loading."""
    if device is None:
        return
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ParamError("device", f"device {text!r} is not one of cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParamError("device", f"device {text!r}: qwenlm runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamError("device", f"device {text!r}: no CUDA GPU is available here "
                                       "(torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ParamError("device", f"device {text!r}: this machine has {count} CUDA device(s), "
                                       f"cuda:0..cuda:{count - 1}")


def check_tensor_parallel(size, quantize: str | None = None, adapter=None) -> None:
    """tensor_parallel_size is a whole number >= 1, and what the other options need of the whole weights is off."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ParamError("tensor_parallel_size", f"tensor_parallel_size must be an integer >= 1, got {size!r}")
    if size > 1 and quantize is not None:
        raise ParamError("quantize", f"quantize={quantize!r} works on the whole weights; it cannot be combined with "
                                     f"tensor_parallel_size {size} (use a GPTQ folder instead)")
    if size > 1 and adapter is not None:
        raise ParamError("adapter", f"an adapter is merged into the whole weights; with tensor_parallel_size {size} "
                                    "merge it first (qwenlm merge) and load the merged folder")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Checkpoint:
    """A loaded folder: the network on its device, its tokenizer and generation config."""
    model: QWenLMHeadModel
    tokenizer: Tokenizer
    generation_config: GenerationConfig
    folder: Path


def load_checkpoint(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
                    dtype: str | torch.dtype | None = "auto", progress: bool = True,
                    quantize: str | None = None, adapter: str | Path | None = None,
                    tensor_parallel_size: int = 1) -> Checkpoint:
    """A Qwen v1 checkpoint folder (or hub name) loaded onto `device` (default: CUDA where present).
    adapter: a PEFT LoRA adapter folder merged into the weights after loading (`qwenlm.adapters`).
    quantize="int8" turns a bf16/fp16 folder's block linears into per-channel int8 after that.
    tensor_parallel_size N > 1: this process holds rank 0's slice of the model and starts N - 1 worker processes
    holding the others (`qwenlm.engine.tp_workers`); the model then runs only inside an engine (LLMEngine). Under
    torchrun (WORLD_SIZE = N processes) nothing is spawned: RANK 0 returns its slice, every other rank runs the
    worker loop and then exits its process (`qwenlm.engine.tp_launch`)."""
    check_device(device)  # the arguments first: resolving may download, loading takes minutes
    check_tensor_parallel(tensor_parallel_size, quantize, adapter)
    dtype = parse_dtype(dtype)
    if quantize not in (None, *quant.QUANTIZE_METHODS):
        raise ParamError("quantize", f"quantize={quantize!r} is not supported; choose one of "
                                     f"{', '.join(quant.QUANTIZE_METHODS)} or None")
    if adapter is not None:
        read_adapter_config(adapter)  # a missing or foreign adapter fails before minutes of loading
    folder = resolve_model(name_or_path)
    gen_file = folder / "generation_config.json"  # read before the weights: a bad value fails in a second
    gen = GenerationConfig.from_file(gen_file) if gen_file.is_file() else GenerationConfig()
    if tensor_parallel_size > 1:
        from qwenlm.engine.tp_engine import load_tp_engine_model
        model = load_tp_engine_model(folder, tensor_parallel_size, device or default_device(), dtype, progress)
        return Checkpoint(model, Tokenizer.from_folder(folder), gen, folder)
    model = load_model(folder, device=device or default_device(), dtype=dtype, progress=progress)
    if adapter is not None:
        load_adapter(model, adapter)
    quant.apply_quantize(model, quantize, str(folder))
    return Checkpoint(model, Tokenizer.from_folder(folder), gen, folder)
