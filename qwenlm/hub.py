"""Resolve a model argument: a local checkpoint folder, or a hub name downloaded through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen-7B-Chat"

# Only what qwenlm reads; the official *.py remote code is never needed.
_PATTERNS = ["*.json", "*.safetensors", "*.bin", "qwen.tiktoken"]


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name}: no such checkpoint folder (pass a local folder holding config.json "
                                 "and the weights, or a hub name such as Qwen/Qwen-7B-Chat)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=name, allow_patterns=_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...: all end the same way for the user
        raise ModelNotFoundError(
            f"{name}: could not download from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Without a network, download the folder elsewhere (huggingface-cli download {name} --local-dir DIR) "
            "and pass --model DIR (or qwenlm.load('DIR'))") from None
