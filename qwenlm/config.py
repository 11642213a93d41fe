"""ModelConfig (config.json, current and Aug-2023 key sets) and GenerationConfig (generation_config.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlm.sampling import ParamError, check_bool, check_int, check_param, check_real, check_token_ids

CHAT_FORMATS = ("chatml", "raw")


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


# Keys a folder must give (current names; the Aug-2023 names are mapped first).
_REQUIRED = ("seq_length", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                  "intermediate_size", "seq_length", "max_position_embeddings")
_BOOLS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "bf16", "fp16", "fp32", "tie_word_embeddings")


def _check_config_value(name: str, value):
    """One config.json value checked for type and range (ParamError naming the key otherwise)."""
    if name in _POSITIVE_INTS:
        return check_int(name, value, 1)
    if name in _BOOLS:
        return check_bool(name, value)
    if name in ("rotary_emb_base", "layer_norm_epsilon"):
        return check_real(name, value, lambda x: x > 0, "a number > 0")
    if name == "rotary_pct":
        return check_real(name, value, lambda x: 0 < x <= 1, "a number in (0, 1]")
    if name == "quantization_config" and value is not None and not isinstance(value, dict):
        raise ParamError(name, f"quantization_config must be an object, got {value!r}")
    return value


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
        old_names = {new: old for old, new in _OLD_KEYS.items()}
        for name in _REQUIRED:  # a default here would build a different network and blame a tensor shape
            if name not in raw:
                alt = f" (or {old_names[name]!r})" if name in old_names else ""
                why = " (the official code requires it)" if name == "seq_length" else ""
                raise ConfigError(f"{source}: missing field {name!r}{alt}{why}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        try:
            for name, value in kwargs.items():
                kwargs[name] = _check_config_value(name, value)
        except ParamError as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
            raise ConfigError(f"{source}: kv_channels {cfg.kv_channels} x num_attention_heads "
                              f"{cfg.num_attention_heads} must equal hidden_size {cfg.hidden_size}")
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
    """generation_config.json; defaults are Qwen-7B-Chat's (spec §12.3). Values are checked when made
    (from the file, `replace`, `:conf`) by the same rules as SamplingParams; null means the default."""

    chat_format: str = "chatml"
    eos_token_id: int = 151643
    pad_token_id: int | None = 151643
    max_window_size: int = 6144
    max_new_tokens: int = 512
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 0.8
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    stop_words_ids: list = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):  # transformers writes null for "not set": the default applies
            if getattr(self, f.name) is None and f.name not in ("pad_token_id", "seed"):
                setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default)
        if self.chat_format not in CHAT_FORMATS:
            raise ParamError("chat_format", f"chat_format must be one of {', '.join(map(repr, CHAT_FORMATS))}, "
                                            f"got {self.chat_format!r}")
        if isinstance(self.eos_token_id, list):  # transformers allows several
            self.eos_token_id = check_token_ids("eos_token_id", self.eos_token_id)
        else:
            self.eos_token_id = check_int("eos_token_id", self.eos_token_id, 0)
        if self.pad_token_id is not None:
            self.pad_token_id = check_int("pad_token_id", self.pad_token_id, 0)
        self.max_window_size = check_int("max_window_size", self.max_window_size, 1)
        self.max_new_tokens = check_param("max_new_tokens", self.max_new_tokens, rule="max_tokens")
        self.do_sample = check_bool("do_sample", self.do_sample)
        for name in ("top_k", "top_p", "temperature", "repetition_penalty", "seed"):
            setattr(self, name, check_param(name, getattr(self, name)))
        if not isinstance(self.stop_words_ids, list):
            raise ParamError("stop_words_ids", f"stop_words_ids must be a list of token id lists, "
                                               f"got {self.stop_words_ids!r}")
        self.stop_words_ids = [check_token_ids("stop_words_ids", ids, f"stop_words_ids[{i}]")
                               for i, ids in enumerate(self.stop_words_ids)]

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except ParamError as e:
            if source is None:
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        return cls.from_dict(_read_json(path), str(path))

    def replace(self, **overrides) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ParamError(unknown[0], f"unknown generation setting(s): {', '.join(unknown)}; "
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
