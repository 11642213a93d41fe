"""ModelConfig (config.json, current and Aug-2023 key sets) and GenerationConfig (generation_config.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A config file or field is missing or wrong; the message names the file and the field."""


# Aug-2023 Qwen-7B-Chat used Megatron-style names (spec §21.1); map them onto the current ones.
_OLD_KEYS = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
    "n_positions": "max_position_embeddings",
}


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # both MLP branches together; each branch is intermediate_size // 2
    seq_length: int = 8192
    max_position_embeddings: int = 32768
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None
    model_type: str = "qwen"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct) if self.rotary_pct < 1 else self.kv_channels

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size // 2

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        raw = dict(raw)
        model_type = raw.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen' (Qwen v1); "
                              "Qwen1.5/Qwen2 folders ('qwen2') are a different architecture")
        for old, new in _OLD_KEYS.items():
            if old in raw and new not in raw:
                raw[new] = raw[old]
        if "seq_length" not in raw:
            raise ConfigError(f"{source}: missing field 'seq_length' (the official code requires it)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        cfg = cls(**kwargs)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
        if sum([cfg.bf16, cfg.fp16, cfg.fp32]) > 1:
            raise ConfigError(f"{source}: at most one of bf16/fp16/fp32 may be true")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(_read_json(path), str(path))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["quantization_config"] is None:
            del out["quantization_config"]
        out["architectures"] = ["QWenLMHeadModel"]
        return out

    def auto_dtype(self, device: torch.device | str) -> torch.dtype:
        """The official precision rule (spec §4): the config's flag, else bf16 > fp16 > fp32 by hardware."""
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        if self.fp32:
            return torch.float32
        device = torch.device(device)
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            if torch.cuda.get_device_capability(device)[0] >= 7:
                return torch.float16
        return torch.float32


@dataclass
class GenerationConfig:
    """generation_config.json; defaults are Qwen-7B-Chat's (spec §12.3)."""

    chat_format: str = "chatml"
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    max_window_size: int = 6144
    max_new_tokens: int = 512
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 0.8
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    stop_words_ids: list = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        return cls.from_dict(_read_json(path))

    def replace(self, **overrides) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
