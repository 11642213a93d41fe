"""Writing files: under a temporary name renamed into place (a crash never leaves a half-written file under
the real name), with the permissions the user's umask gives (safetensors' own writer leaves 0600)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask would set it for a moment,
    racing other threads that create files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What open() gives a new file: 0666 less the umask (0644 under the usual 022)."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """`with atomic_path(p) as tmp: <write tmp>`: on success tmp gets the umask's mode and replaces p;
    on any error tmp is removed and p is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, command: str):
    """`with atomic_dir(out, "qwenlm merge") as tmp: <fill the folder tmp>`: tmp is the hidden sibling
    ".<name>.incomplete-<pid>", renamed to `out` on success; on any error (or Ctrl-C) it is removed and
    stderr says that nothing was written, so a folder under the real name is always complete."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__}: {e})"
        print(f"{command}: {what}; nothing was written to {path}", file=sys.stderr)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json_lines(lines, fail) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of JSON Lines text; a line that is not JSON raises
    fail(line number, index among the values, json's message), the caller's own error naming its file."""
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise fail(n, len(out), e.msg) from None
    return out
