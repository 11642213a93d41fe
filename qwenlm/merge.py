"""`qwenlm merge`: a base checkpoint folder plus a LoRA adapter, written as a normal checkpoint folder.

The output is the official layout — sharded safetensors (`model-0000N-of-0000M.safetensors`, at most 2 GB
each, as the official merge recipe's `save_pretrained(max_shard_size="2048MB")`) with
`model.safetensors.index.json`, and the base's config.json, generation_config.json, qwen.tiktoken,
tokenizer and code files copied unchanged — so `qwenlm quantize` (and transformers with the official code)
read it like any release. The weights keep the dtype the base folder stores. The folder is written under a
hidden ".<name>.incomplete-<pid>" sibling and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from qwenlm.adapters import gptq_merge_error, load_adapter, read_adapter_config
from qwenlm.config import ModelConfig
from qwenlm.files import atomic_dir, save_safetensors, write_text
from qwenlm.hub import resolve_model
from qwenlm.loading import check_device
from qwenlm.model.loader import checkpoint_files, load_model

MAX_SHARD_BYTES = 2 * 1024 ** 3
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def merge_to_folder(base: str | Path, adapter: str | Path, out: str | Path, device: str = "cpu",
                    max_shard_bytes: int | None = None, progress: bool = True) -> Path:
    """Merge the adapter into the base model and write the result to `out` (a new folder). Returns out.
    max_shard_bytes: the largest weight file (default MAX_SHARD_BYTES)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"parent folder of the output {out.parent} does not exist")
    check_device(device)
    read_adapter_config(adapter)  # a bad adapter fails before the base loads
    base = resolve_model(str(base))  # a folder, or a hub name downloaded
    if ModelConfig.from_file(base / "config.json").quantization_config:
        raise gptq_merge_error(str(base))
    files = checkpoint_files(base)
    model = load_model(base, device, _stored_dtype(files[0]), progress=progress)
    load_adapter(model, adapter)
    with atomic_dir(out, "qwenlm merge") as tmp:
        skip = {p.name for p in files} | set(_WEIGHT_INDEXES)
        for src in base.iterdir():  # config, generation config, tokenizer, code: copied unchanged
            if src.is_file() and src.name not in skip and not src.name.startswith("."):
                shutil.copy2(src, tmp / src.name)
        write_sharded(model.state_dict(), tmp, max_shard_bytes or MAX_SHARD_BYTES, progress)
    return out


def write_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int, progress: bool = True) -> None:
    """Tensors in state order, a new shard whenever the next tensor would pass max_shard_bytes, and the
    index transformers writes (metadata.total_size, weight_map)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(tqdm(shards, desc="Writing", unit="shard", disable=not progress)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors({k: state[k].detach().cpu().contiguous() for k in names}, folder / fname,
                         metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_text(folder / "model.safetensors.index.json",
               json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype of a weight file's first floating tensor (what the base folder stores)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = names.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    else:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        for t in state.values():
            if t.is_floating_point():
                return t.dtype
    return torch.float32
