"""A fully fine-tuned model written as a checkpoint folder in the official layout, which every qwenlm command
(and the official code) loads: config.json, generation_config.json, the tokenizer files of the base folder,
and safetensors weights under the official names, sharded with an index past one shard's size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qwenlm.files import atomic_path, save_safetensors, write_text

SHARD_BYTES = 4 * 1024**3
# The base folder's files that describe the model rather than hold its weights.
_COPIED = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken",
           "special_tokens_map.json", "configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py",
           "qwen_generation_utils.py", "cpp_kernels.py")


def save_model_folder(state: dict[str, torch.Tensor], base: Path, out: Path) -> Path:
    """Weights `state` (official names, on any device) plus the base folder's config and tokenizer in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        if (base / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(base / name, tmp)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in shards[0].items()},
                         out / "model.safetensors", metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in shard.items()}, out / fname,
                         metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_text(out / "model.safetensors.index.json",
               json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
