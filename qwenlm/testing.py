"""Random checkpoints in the exact official folder layout (bf16/fp32, or GPTQ Int4/Int8), for trying qwenlm
anywhere, for tests (tiny) and for benchmarks (the real shape)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qwenlm.config import GenerationConfig, ModelConfig
from qwenlm.files import atomic_path, save_safetensors, write_text
from qwenlm.model.loader import build_model

VOCAB_FILE = Path(__file__).with_name("qwen.tiktoken")
LAYOUTS = ("safetensors", "sharded", "bin", "sharded-bin")

TINY = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
            intermediate_size=256, seq_length=8192, max_position_embeddings=32768)

# Each size's config.json values (spec §1.1; the other keys are the 7B's, spec §1.2). UNVERIFIED in the spec
# (taken from third-party summaries of the configs, not the files themselves): 1.8B's and 14B's
# max_position_embeddings, and 14B's seq_length 2048.
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size", "seq_length",
              "max_position_embeddings", "rotary_emb_base", "use_dynamic_ntk")
SIZES = {size: {**dict(zip(_SIZE_KEYS, row)), "kv_channels": 128, "use_logn_attn": row[-1]} for size, row in {
    "1_8b": (2048, 24, 16, 11008, 151936, 8192, 8192, 10000, True),
    "7b": (4096, 32, 32, 22016, 151936, 8192, 32768, 10000, True),
    "14b": (5120, 40, 40, 27392, 152064, 2048, 8192, 10000, True),
    "72b": (8192, 80, 64, 49152, 152064, 32768, 32768, 1000000, False),  # NTK and LogN both off
}.items()}


def size_config(size: str, tiny: bool = False) -> dict:
    """config.json values of one size ("1_8b", "7b", "14b", "72b"). tiny=True keeps what sets the size apart
    (embedding rows, seq_length, rotary base, NTK / LogN, head count relative to the others) at a size a test
    runs in milliseconds: heads / 8 of 16 dims, 2 layers, the MLP ~1/64 of the real width (a multiple of 8)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    real = SIZES[size]
    if not tiny:
        return dict(real)
    heads = real["num_attention_heads"] // 8
    ffn = -(-real["intermediate_size"] // 2 // 512) * 8
    return {**real, "hidden_size": heads * 16, "num_hidden_layers": 2, "num_attention_heads": heads,
            "kv_channels": 16, "intermediate_size": 2 * ffn}


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
        **({"torch_dtype": "float16", "quantization_config": cfg.quantization_config}
           if cfg.quantization_config else {}),  # spec §10.1
        # Qwen-72B's config.json (the one size with another base) repeats it under the Llama name (spec §1.1)
        **({"rope_theta": cfg.rotary_emb_base} if cfg.rotary_emb_base != 10000 else {}),
    }


def random_state_dict(cfg: ModelConfig, seed: int = 0, dtype=torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random weights with the official init (spec §2): N(0, 0.02), c_proj scaled, norms 1, biases small.

    With cfg.quantization_config the block linears are GPTQ tensors (spec §10.4): random packed weights,
    symmetric zeros (stored zero - 1), scales giving the same weight spread, trivial g_idx, fp16 scales.
    device: where the numbers are drawn (a GPU draws a 7B model in seconds); the tensors stay there."""
    gen = torch.Generator(device).manual_seed(seed)
    shapes = {k: (v.shape, v.dtype) for k, v in build_model(cfg).state_dict().items()}
    qc = cfg.quantization_config or {}
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    state = {}
    for name, (shape, stored) in shapes.items():
        std = 0.02 / (2 * cfg.num_hidden_layers) ** 0.5 if ".c_proj." in name else 0.02
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        elif name.endswith(".qweight"):
            t = torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=device, dtype=torch.int32)
        elif name.endswith(".qzeros"):
            lane = 2 ** (bits - 1) - 1  # the symmetric zero 2^(b-1), stored minus one, in every lane of a word
            t = torch.full(shape, sum(lane << (bits * j) for j in range(32 // bits)), device=device,
                           dtype=torch.int32)
        elif name.endswith(".g_idx"):
            t = (torch.arange(shape[0], device=device) // group).int()
        elif name.endswith(".scales"):  # uniform codes have std 2^b / sqrt(12)
            t = (std * 12 ** 0.5 / 2**bits * (0.75 + 0.5 * torch.rand(shape, generator=gen, device=device))).half()
        elif name.endswith(".bias") and qc and ".c_attn." not in name:
            t = torch.zeros(shape, device=device)  # AutoGPTQ stores zeros for the linears that have no bias
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen, device=device)  # nonzero so the bias path is exercised
        else:
            t = std * torch.randn(shape, generator=gen, device=device)
        # packed ints stay int32, scales fp16 (as the official files hold them), every other tensor `dtype`
        want = stored if not stored.is_floating_point else torch.float16 if name.endswith(".scales") else dtype
        state[name] = t.to(want).contiguous()
    return state


def make_tiny_checkpoint(out_dir: str | Path, layout: str = "safetensors", seed: int = 0,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         num_shards: int = 2, force: bool = False, size: str | None = None, **overrides) -> Path:
    """Write a random Qwen v1 checkpoint folder. layout: "safetensors", "sharded", "bin" or "sharded-bin"
    (num_shards files + index). size: start from that size's tiny config (`size_config`) instead of TINY.
    overrides: config.json values over TINY (the real shape: ModelConfig()'s, or `size_config(size)`);
    quantization_config makes a GPTQ folder (pass dtype=torch.float16, fp16=True as the official ones).

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
    cfg = ModelConfig.from_dict({**(size_config(size, tiny=True) if size else TINY), **overrides})
    state = random_state_dict(cfg, seed, dtype, device)
    write_text(out / "config.json", json.dumps(official_config_dict(cfg), indent=2))
    if cfg.quantization_config:
        qc = {k: v for k, v in cfg.quantization_config.items() if k != "quant_method"}
        write_text(out / "quantize_config.json", json.dumps(qc, indent=2))
    gen = GenerationConfig().to_dict()
    del gen["seed"], gen["stop_words_ids"], gen["temperature"]
    write_text(out / "generation_config.json", json.dumps({**gen, "transformers_version": "4.31.0"}, indent=2))
    write_text(out / "tokenizer_config.json", json.dumps(
        {"model_max_length": 32768, "tokenizer_class": "QWenTokenizer",
         "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2))
    with atomic_path(out / "qwen.tiktoken") as tmp:
        shutil.copyfile(VOCAB_FILE, tmp)
    ext, prefix = ("safetensors", "model") if layout in ("safetensors", "sharded") else ("bin", "pytorch_model")
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not layout.startswith("sharded"):
        files = {f"{prefix}.{ext}": names}
    else:
        files = {f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.{ext}":
                 names[i * len(names) // num_shards:(i + 1) * len(names) // num_shards] for i in range(num_shards)}
    for fname, part in files.items():  # one file's tensors on the host at a time
        _save_weights({k: state.pop(k).cpu() for k in part}, out / fname)
    if layout.startswith("sharded"):
        weight_map = {k: fname for fname, part in files.items() for k in part}
        write_text(out / f"{prefix}.{ext}.index.json",
                   json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_safetensors(state, path, metadata={"format": "pt"})
    else:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
