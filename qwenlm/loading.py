"""Loading a checkpoint folder: the one path shared by `qwenlm.load` (api.py) and `LLM(path)` (engine.py).

It sits below both so neither imports the other: api.py builds on the engine, and the engine needs only this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlm.config import GenerationConfig
from qwenlm.hub import DEFAULT_MODEL, resolve_model
from qwenlm.model import quant
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.tokenizer import Tokenizer

_DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


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
                    quantize: str | None = None) -> Checkpoint:
    """A Qwen v1 checkpoint folder (or hub name) loaded onto `device` (default: CUDA where present).
    quantize="int8" turns a bf16/fp16 folder's block linears into per-channel int8 after loading."""
    folder = resolve_model(name_or_path)
    model = load_model(folder, device=device or default_device(), dtype=parse_dtype(dtype), progress=progress)
    quant.apply_quantize(model, quantize, str(folder))
    gen_file = folder / "generation_config.json"
    gen = GenerationConfig.from_file(gen_file) if gen_file.is_file() else GenerationConfig()
    return Checkpoint(model, Tokenizer.from_folder(folder), gen, folder)
