"""Per-item results on disk: `<folder>/items.jsonl`, one JSON object a finished item, appended and flushed as
each batch finishes, so an interrupted run resumes where it stopped. `settings.json` beside it records what
made the items; a later run with other settings is refused rather than mixing two kinds of result."""
from __future__ import annotations

import json
import os
from pathlib import Path

from qwenlm.files import write_text


class ItemCache:
    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "items.jsonl"
        settings_path = self.folder / "settings.json"
        if settings_path.exists():
            old = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                raise ValueError(f"{self.folder}: holds results made with other settings ({', '.join(changed)}: "
                                 f"{old.get(changed[0])!r}, now {settings.get(changed[0])!r}); "
                                 f"choose another --out or remove the folder")
        else:
            write_text(settings_path, json.dumps(settings, indent=1, ensure_ascii=False) + "\n")
        self.done: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by an interrupted write: drop it (its item is redone)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        done = {}
        for n, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            try:
                obj = json.loads(line)
                done[obj["key"]] = obj
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path}: line {n}: not a result line; remove the file to start over") from None
        return done

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a finished item survives a crash or a killed run
        for r in records:
            self.done[r["key"]] = r
