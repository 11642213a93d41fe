"""LoRA adapters in PEFT's folder format, merged into a loaded model for inference.

An adapter folder is what `PeftModel.save_pretrained` writes, for the official `finetune.py` as for
`qwenlm finetune`: `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`), with keys
`base_model.model.transformer.h.N.attn.c_attn.lora_A.weight` / `.lora_B.weight` (the adapter name is not
in the file) and, for modules_to_save (the official base-model LoRA trains `wte` and `lm_head` whole),
the full tensors under `base_model.model.transformer.wte.weight` / `base_model.model.lm_head.weight`.

Merging is PEFT's `merge_and_unload` arithmetic: W += scale * B @ A with scale = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), in fp32 and rounded once to the model's dtype. Every file, field
and tensor is checked before the model is touched, so a bad adapter leaves the model as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwenlm.config import ConfigError
from qwenlm.config import _read_json as read_json_object
from qwenlm.model.quant import GPTQLinear

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
# Fields of a PEFT LoraConfig whose non-default value changes what the weights mean in ways merged here wrongly.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None,
                "rank_pattern": {}, "alpha_pattern": {}, "use_qalora": False, "trainable_token_indices": None,
                "target_parameters": None}


class AdapterError(ValueError):
    """An adapter folder, config field or tensor is missing or wrong; the message names which."""


def gptq_merge_error(where: str) -> AdapterError:
    return AdapterError(
        f"{where}: the model is GPTQ-quantized, and a LoRA adapter cannot be merged into Int4/Int8 weights. "
        "Merge it into the bf16/fp16 model it was trained from (qwenlm merge --base BASE --adapter ADAPTER "
        "--out MERGED), then quantize the merged folder (qwenlm quantize --model MERGED --data CALIB --out "
        "MERGED-Int4)")


@dataclass
class Adapter:
    folder: Path
    weights_file: Path
    config: dict
    scale: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])
    tensors: dict[str, torch.Tensor]  # full tensors replacing the model's (modules_to_save, biases)


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict, Path]:
    """adapter_config.json checked, and the weights file; no tensor is read (a quick check before loading)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (a PEFT adapter folder holds {CONFIG_FILE} and "
                           f"{' or '.join(WEIGHT_FILES)})")
    try:
        cfg = read_json_object(cfg_path)
    except ConfigError as e:
        raise AdapterError(str(e)) from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters ('LORA') merge")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterError(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    for field, default in _UNSUPPORTED.items():
        if cfg.get(field, default) not in (default, None, {}, False):
            raise AdapterError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (plain LoRA only)")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{cfg_path}: target_modules must be a list of module names or a regex, got {targets!r}")
    for path in (folder / name for name in WEIGHT_FILES):
        if path.is_file():
            return cfg, path
    raise AdapterError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """An adapter folder read and checked on its own (against the model: `merge_adapter`)."""
    cfg, path = read_adapter_config(adapter_dir)
    state = _read_tensors(path)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    tensors = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{path}: tensor {key!r} is not in PEFT's format ({PREFIX}<module>.lora_A.weight)")
        m = _LORA_KEY.fullmatch(key[len(PREFIX):])
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in key:
            raise AdapterError(f"{path}: tensor {key!r} is not a plain LoRA weight (lora_A.weight / lora_B.weight)")
        else:
            tensors[key[len(PREFIX):]] = t
    r = cfg["r"]
    pairs = {}
    for name, ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: {name} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise AdapterError(f"{path}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                               f"{CONFIG_FILE} says r={r} (lora_A [r, in], lora_B [out, r])")
        if not _names(name, cfg["target_modules"]) or _excluded(name, cfg):
            raise AdapterError(f"{path}: {name} has LoRA weights but {CONFIG_FILE} target_modules "
                               f"{cfg['target_modules']!r} does not name it")
        pairs[name] = (A, B)
    saved = cfg.get("modules_to_save") or []
    for key in tensors:
        module = key.rpartition(".")[0]
        if not (_names(module, saved) or (key.endswith(".bias") and cfg.get("bias", "none") != "none")):
            raise AdapterError(f"{path}: tensor {key!r} is neither a LoRA weight nor part of a module in "
                               f"modules_to_save {saved!r}")
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return Adapter(Path(adapter_dir), path, cfg, scale, pairs, tensors)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder and merge it into `model` (bf16/fp16/fp32) in place."""
    adapter = read_adapter(adapter_dir)
    merge_adapter(model, adapter)
    return adapter


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """W += scale * B @ A for every adapted linear; modules_to_save tensors replace the model's."""
    where, targets = adapter.weights_file, adapter.config["target_modules"]
    modules = dict(model.named_modules())
    if any(isinstance(m, GPTQLinear) for m in modules.values()):
        raise gptq_merge_error(str(adapter.folder))
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    for entry in [targets] if isinstance(targets, str) else [[t] for t in targets]:
        if not any(_names(n, entry) for n in modules):
            t = entry if isinstance(entry, str) else entry[0]
            raise AdapterError(f"{where}: target_modules entry {t!r} names no module of this model")
    expected = {n for n in linears if _names(n, targets) and not _excluded(n, adapter.config)
                and _layer_selected(n, adapter.config)}
    for name, (A, B) in adapter.lora.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise AdapterError(f"{where}: {name} matches no linear layer of this model (an adapter for "
                               f"another model or size?)")
        if A.shape[1] != mod.in_features or B.shape[0] != mod.out_features:
            raise AdapterError(f"{where}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; the "
                               f"model's layer is {mod.in_features} -> {mod.out_features}")
    missing = sorted(expected - set(adapter.lora))
    if missing:
        raise AdapterError(f"{where}: no LoRA weights for {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which "
                           f"target_modules {targets!r} names (an adapter for a model with fewer layers?)")
    params = dict(model.named_parameters())
    for key, t in adapter.tensors.items():
        if key not in params:
            raise AdapterError(f"{where}: tensor {key!r} matches no weight of this model")
        if tuple(t.shape) != tuple(params[key].shape):
            raise AdapterError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, the model's is "
                               f"{tuple(params[key].shape)} (a different vocabulary or size?)")
    # Everything checked: from here on nothing fails halfway.
    for key, t in adapter.tensors.items():
        params[key].copy_(t)
    for name, (A, B) in adapter.lora.items():
        w = modules[name].weight
        delta = B.to(w.device, torch.float32) @ A.to(w.device, torch.float32)  # [out, in]
        w.copy_((w.float() + adapter.scale * delta).to(w.dtype))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for a truncated or foreign file
        raise AdapterError(f"{path}: cannot read the adapter weights (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected a dict of tensors")
    return state


def _names(module: str, targets) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list entry names a module exactly
    or as its last dotted part(s) ("c_proj" matches both attn.c_proj and mlp.c_proj)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _excluded(module: str, cfg: dict) -> bool:
    exclude = cfg.get("exclude_modules")
    return bool(exclude) and _names(module, exclude)


def _layer_selected(module: str, cfg: dict) -> bool:
    """layers_to_transform: only these block indices (transformer.h.N) carry LoRA."""
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return True
    m = re.search(r"\.h\.(\d+)\.", module)
    return m is not None and int(m.group(1)) in ([layers] if isinstance(layers, int) else layers)
