"""Compiled kernels kept on disk, so the second start of the same model on the same machine skips compiling.

torch.compile already keeps Inductor's FX-graph and autotuning caches under /tmp; they are lost on reboot
and in fresh containers, and one start's worth of them is scattered over many files. torch's "mega-cache"
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) packs every artifact a compile made (FX
graphs, AOT-autograd entries, Triton autotune picks, dynamo's shape profile) into one blob that a later
process hot-loads before compiling, turning each compile into a cache hit. One blob per key: what the
compiled code depends on (the network's shapes and dtypes, the weight formats, the engine config, torch,
the device), never the weight values, so a fine-tuned model of the same shape shares it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from qwenlm.files import atomic_path

log = logging.getLogger("qwenlm.engine")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenlm" / "compile"


def cache_key(model, engine_config) -> str:
    """What the compiled code depends on, hashed."""
    p = next(model.parameters())
    device = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else p.device.type
    layers = sorted({type(m).__qualname__ for m in model.modules()})  # quantized linears compile differently
    what = {"model": dataclasses.asdict(model.config), "dtype": str(p.dtype), "layers": layers,
            "engine": dataclasses.asdict(engine_config), "torch": torch.__version__, "device": device}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(key: str, folder: Path | None = None) -> bool:
    """Hot-load the artifacts saved under `key`; False (and a log line) when there are none or they are
    unreadable, in which case compiling simply runs as on a first start."""
    path = (folder or cache_dir()) / f"{key}.bin"
    if not path.is_file():
        log.info("no compiled kernels cached for this model and config yet: the first start compiles them "
                 "(up to a minute or two) and saves them to %s", path)
        return False
    try:  # torch logs and returns None for a blob it cannot read (another torch build, cut short)
        loaded = torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception as e:
        log.warning("could not load the compiled kernels cached in %s (%s: %s)", path, type(e).__name__, e)
        loaded = False
    if not loaded:
        log.warning("the compiled kernels cached in %s could not be used; compiling them again", path)
        return False
    log.info("loaded the compiled kernels cached in %s", path)
    return True


def save(key: str, folder: Path | None = None) -> Path | None:
    """Save what this process compiled under `key` (atomically: a reader never sees half a file)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return None
    path = (folder or cache_dir()) / f"{key}.bin"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(artifacts[0])
    except OSError as e:  # a read-only home: serving goes on, the next start compiles again
        log.warning("could not save the compiled kernels to %s: %s", path, e)
        return None
    log.info("saved the compiled kernels to %s (%.1f MB) for the next start", path, len(artifacts[0]) / 1e6)
    return path
