"""`--deepspeed ds_config.json`: the official DeepSpeed configs read for what they mean here, with no second loop.

What carries over: the ZeRO stage (3 shards weights, gradients and optimizer state: FSDP2; 0-2 keep a whole model
per GPU: DDP) and an explicitly enabled bf16 / fp16. The rest has no counterpart or is "auto" (filled from the
command line by transformers in the official scripts) and is listed as ignored: in particular the `WarmupLR`
scheduler, which in the official runs replaces the cosine schedule; here the cosine runs (see optim.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenlm.sampling import ParamError

_USED = {"zero_optimization", "bf16", "fp16"}


def settings_from_deepspeed(path: str | Path) -> tuple[dict, list[str]]:
    """(FinetuneConfig fields it sets, the config's keys that are ignored)."""
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise ParamError("deepspeed", f"--deepspeed: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ParamError("deepspeed", f"--deepspeed: {path} is not JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ParamError("deepspeed", f"--deepspeed: {path} must hold a JSON object")
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ParamError("deepspeed", f"--deepspeed: {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    out = {"sharding": "fsdp" if stage == 3 else "ddp"}
    for key, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        if (ds.get(key) or {}).get("enabled") is True:
            out["dtype"] = dtype
    ignored = sorted(set(ds) - _USED) + sorted(f"zero_optimization.{k}" for k in zero if k != "stage")
    return out, ignored
