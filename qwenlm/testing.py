"""Tiny random checkpoints in the exact official folder layout, for trying qwenlm anywhere and for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qwenlm.config import GenerationConfig, ModelConfig
from qwenlm.files import atomic_path, save_safetensors, write_text
from qwenlm.model.qwen import QWenLMHeadModel

VOCAB_FILE = Path(__file__).with_name("qwen.tiktoken")
LAYOUTS = ("safetensors", "sharded", "bin", "sharded-bin")

TINY = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
            intermediate_size=256, seq_length=8192, max_position_embeddings=32768)


def official_config_dict(cfg: ModelConfig) -> dict:
    """config.json with the official keys and values (spec §1.2)."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
        "bf16": cfg.bf16, "fp16": cfg.fp16, "fp32": cfg.fp32,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "initializer_range": 0.02, "kv_channels": cfg.kv_channels,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "qwen", "no_bias": cfg.no_bias, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "onnx_safe": None, "rotary_emb_base": cfg.rotary_emb_base,
        "rotary_pct": cfg.rotary_pct, "scale_attn_weights": True, "seq_length": cfg.seq_length,
        "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
        "use_cache": True, "use_dynamic_ntk": cfg.use_dynamic_ntk, "use_flash_attn": "auto",
        "use_logn_attn": cfg.use_logn_attn, "vocab_size": cfg.vocab_size,
    }


def random_state_dict(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with the official init (spec §2): N(0, 0.02), c_proj scaled, norms 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in QWenLMHeadModel(cfg).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)  # nonzero so the bias path is exercised
        else:
            std = 0.02 / (2 * cfg.num_hidden_layers) ** 0.5 if name.endswith("c_proj.weight") else 0.02
            t = std * torch.randn(shape, generator=gen)
        state[name] = t.to(dtype).contiguous()
    return state


def make_tiny_checkpoint(out_dir: str | Path, layout: str = "safetensors", seed: int = 0,
                         dtype: torch.dtype = torch.float32, force: bool = False, **overrides) -> Path:
    """Write a random Qwen v1 checkpoint folder. layout: "safetensors", "sharded", "bin" or "sharded-bin".

    A folder that already holds files is refused unless force=True: pointed at a real model by mistake,
    this would replace its config.json and weights. Each file is written under a temporary name first."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: folder is not empty; writing a tiny checkpoint there would replace its "
                              "config.json and weights (choose an empty or new folder, or pass --force)")
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict({**TINY, **overrides})
    state = random_state_dict(cfg, seed, dtype)
    write_text(out / "config.json", json.dumps(official_config_dict(cfg), indent=2))
    gen = GenerationConfig().to_dict()
    del gen["seed"], gen["stop_words_ids"], gen["temperature"]
    write_text(out / "generation_config.json", json.dumps({**gen, "transformers_version": "4.31.0"}, indent=2))
    write_text(out / "tokenizer_config.json", json.dumps(
        {"model_max_length": 32768, "tokenizer_class": "QWenTokenizer",
         "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    with atomic_path(out / "qwen.tiktoken") as tmp:
        shutil.copyfile(VOCAB_FILE, tmp)
    if layout in ("safetensors", "bin"):
        _save_weights(state, out / ("model.safetensors" if layout == "safetensors" else "pytorch_model.bin"))
    else:
        names = list(state)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        ext, prefix = ("safetensors", "model") if layout == "sharded" else ("bin", "pytorch_model")
        weight_map = {}
        for i, part in enumerate(halves, 1):
            fname = f"{prefix}-{i:05d}-of-00002.{ext}"
            _save_weights({k: state[k] for k in part}, out / fname)
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index_name = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        write_text(out / index_name, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return out


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_safetensors(state, path, metadata={"format": "pt"})
    else:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
