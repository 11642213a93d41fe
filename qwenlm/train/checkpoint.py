"""Training checkpoints: folders that are either complete or ignored, and the RNG states that make resuming exact.

Protocol: everything is written into `output/.checkpoint-N.tmp`, each file fsynced, then the marker
`complete.json` (written last, itself atomically), then the folder is renamed to `output/checkpoint-N`. A
folder counts as a checkpoint only under its final name *and* with the marker, so a run killed at any
moment (kill -9, power loss after the fsyncs) leaves either a complete checkpoint or a temporary folder that
resuming ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from qwenlm.files import write_text

PREFIX = "checkpoint-"
MARKER = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_checkpoint(output: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into (one writer per output folder: the main process)."""
    output.mkdir(parents=True, exist_ok=True)
    remove_incomplete(output)
    tmp = output / f".{PREFIX}{step}.tmp"
    tmp.mkdir()
    return tmp


def finish_checkpoint(output: Path, step: int, tmp: Path) -> Path:
    """fsync, marker, rename: `tmp` becomes `output/checkpoint-<step>`."""
    final = output / f"{PREFIX}{step}"
    _fsync_tree(tmp)
    write_text(tmp / MARKER, json.dumps({"step": step}))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved by an earlier, interrupted run of this output
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
    return final


def save_checkpoint(output: Path, step: int, write) -> Path:
    """Checkpoint `step` under `output` in one process: write(tmp_folder) fills it, then marker and rename."""
    tmp = begin_checkpoint(output, step)
    try:
        write(tmp)
        return finish_checkpoint(output, step, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(folder: Path) -> bool:
    m = _NAME.match(folder.name)
    if not (m and folder.is_dir() and (folder / MARKER).is_file()):
        return False
    try:
        return json.loads((folder / MARKER).read_text()).get("step") == int(m.group(1))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under `output`, oldest first."""
    if not output.is_dir():
        return []
    found = [p for p in output.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def remove_incomplete(output: Path) -> None:
    """Temporary folders left by a killed save (never read: they may be half written)."""
    for p in output.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- RNG states

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: Path) -> None:
    torch.save(rng_state(), path)


def load_rng(path: Path) -> None:
    set_rng_state(torch.load(path, weights_only=True))
