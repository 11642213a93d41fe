"""FinetuneConfig: every setting of `qwenlm finetune`, with the official scripts' values as defaults (spec §15).

The same dataclass serves the command line (one option per field, `--field-name`) and Python
(`qwenlm.train.finetune(FinetuneConfig(...))`). `check()` validates every field before anything loads; an
error names the option (`--method`), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from qwenlm.sampling import ParamError

METHODS = ("full", "lora", "qlora")
LABEL_RULES = ("official", "assistant-only")
ON_LONG = ("error", "skip", "truncate")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SHARDINGS = ("auto", "ddp", "fsdp")


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, message: str):
    raise ParamError(name, f"{option(name)}: {message}")


@dataclass
class FinetuneConfig:
    model: str = ""  # checkpoint folder (official layout; a GPTQ Int4/Int8 folder for qlora)
    data: list[str] = field(default_factory=list)  # training files: JSON / JSONL, official or OpenAI messages
    output: str = ""  # LoRA: the adapter folder; full: a model folder in the official layout
    method: str = "lora"
    max_len: int = 512  # tokens per sample (official scripts: model_max_length 512)
    labels: str = "official"  # official: spec §15 rule; assistant-only: assistant content and its <|im_end|>
    on_long: str = "error"  # a sample over max_len: error, skip (counted), truncate (the official cut)
    packing: bool = True  # samples packed into batch_tokens; off: micro_batch samples padded per batch
    batch_tokens: int | None = None  # token budget of one packed micro-batch (default max_len)
    micro_batch: int = 1  # samples per micro-batch without packing (official LoRA scripts: 2, full: 1)
    grad_accum: int = 8  # micro-batches per optimizer step, over all processes (official LoRA scripts: 8)
    epochs: int = 5  # official scripts: 5
    lr: float | None = None  # default 3e-4 for lora/qlora, 1e-5 for full (official scripts)
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    optimizer: str = "auto"  # auto: adamw8bit for full fine-tuning on CUDA, else adamw
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_embeddings: bool | None = None  # wte + lm_head trained in full; default as finetune.py (see below)
    save_steps: int = 0  # checkpoint every N optimizer steps (0: none)
    resume: bool = False  # continue from the newest complete checkpoint in output
    seed: int = 42  # transformers' TrainingArguments default, which the official scripts keep
    gradient_checkpointing: bool = True  # official scripts: on
    dtype: str = "auto"  # auto: bf16 where the GPU has it, else fp16; fp32 on CPU (qlora too: see qlora.py)
    device: str | None = None  # default: cuda when available
    eval_data: list[str] = field(default_factory=list)  # held-out files: loss after each epoch
    sharding: str = "auto"  # many processes: ddp, fsdp (FSDP2); auto: fsdp for full, ddp for lora / qlora
    deepspeed: str | None = None  # an official ds_config*.json: its ZeRO stage and dtype (deepspeed.py)
    progress: bool = True

    def check(self) -> FinetuneConfig:
        """Every field checked (no model or data loaded); returns self."""
        if not self.model:
            _fail("model", "a checkpoint folder is required")
        if not Path(self.model).is_dir():
            _fail("model", f"checkpoint folder {self.model!r} not found")
        if not (Path(self.model) / "config.json").is_file():
            _fail("model", f"{self.model!r} has no config.json (not a checkpoint folder)")
        if not self.output:
            _fail("output", "an output folder is required")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            _fail("output", f"{self.output!r} exists and is not a folder")
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.eval_data, (str, Path)):
            self.eval_data = [str(self.eval_data)]
        if not self.data:
            _fail("data", "at least one training file is required")
        for name in ("data", "eval_data"):
            for path in getattr(self, name):
                if not Path(path).is_file():
                    _fail(name, f"file {str(path)!r} not found")
        for name, allowed in (("method", METHODS), ("labels", LABEL_RULES), ("on_long", ON_LONG),
                              ("optimizer", OPTIMIZERS), ("dtype", DTYPES), ("sharding", SHARDINGS)):
            if getattr(self, name) not in allowed:
                _fail(name, f"unknown value {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("max_len", "micro_batch", "grad_accum", "epochs", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, f"must be a positive integer, got {value!r}")
        for name in ("save_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, f"must be an integer >= 0, got {value!r}")
        if self.batch_tokens is not None and (not isinstance(self.batch_tokens, int) or self.batch_tokens < self.max_len):
            _fail("batch_tokens", f"must be an integer >= --max-len ({self.max_len}), got {self.batch_tokens!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            _fail("lr", f"must be a number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            _fail("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            _fail("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip < 0:
            _fail("grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.lora_alpha <= 0:
            _fail("lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            _fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        quantized = "quantization_config" in self.model_config_json()
        if self.deepspeed:
            from qwenlm.train.deepspeed import settings_from_deepspeed
            for name, value in settings_from_deepspeed(self.deepspeed)[0].items():
                setattr(self, name, value)
        if self.method == "qlora" and not quantized:
            _fail("method", f"qlora trains on a GPTQ Int4/Int8 folder, and {self.model!r} has no "
                            "quantization_config in config.json (use --method lora for a bf16/fp16 folder)")
        if self.method != "qlora" and quantized:
            _fail("method", f"{self.model!r} is GPTQ-quantized: its weights cannot be trained; use --method qlora")
        if self.method == "qlora" and self.train_embeddings:
            _fail("train_embeddings", "not with qlora (as finetune.py: the quantized base stays frozen)")
        if self.method == "full" and self.train_embeddings is False:
            _fail("train_embeddings", "full fine-tuning trains every weight, the embeddings included")
        return self

    def model_config_json(self) -> dict:
        try:
            return json.loads((Path(self.model) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            _fail("model", f"cannot read {Path(self.model) / 'config.json'}: {e}")

    # ------------------------------------------------------------ defaults that depend on other fields

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1e-5 if self.method == "full" else 3e-4

    @property
    def packing_budget(self) -> int:
        return self.batch_tokens or self.max_len

    @property
    def assistant_only(self) -> bool:
        return self.labels == "assistant-only"

    def embeddings_trained(self) -> bool:
        """finetune.py trains wte and lm_head in full with plain LoRA on a base (non-chat) model, so it learns
        the ChatML tokens, which a base model never saw; not for chat models or Q-LoRA. A base model is told
        by its folder name, as finetune.py does ("chat" not in the name)."""
        if self.method == "full":
            return True
        if self.train_embeddings is not None:
            return self.train_embeddings
        return self.method == "lora" and "chat" not in Path(self.model).resolve().name.lower()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- the command line: one option per field

_HELP = {
    "model": "checkpoint folder (a GPTQ Int4/Int8 folder for qlora)",
    "data": "training files: JSON list or JSONL, official {conversations} or OpenAI {messages} samples",
    "output": "output folder: the adapter (lora, qlora) or a model folder (full); checkpoints go inside",
    "method": "full, lora or qlora (default lora)",
    "max_len": "tokens per sample (default 512, the official scripts')",
    "labels": "official (default: the finetune.py rule) or assistant-only",
    "on_long": "a sample over --max-len: error (default), skip, or truncate (the official cut)",
    "packing": "pack samples into --batch-tokens (default) or pad --micro-batch samples per batch",
    "batch_tokens": "token budget of one packed micro-batch (default --max-len)",
    "micro_batch": "samples per micro-batch with --no-packing (default 1)",
    "grad_accum": "micro-batches per optimizer step, over all processes (default 8)",
    "epochs": "passes over the data (default 5, the official scripts')",
    "lr": "peak learning rate (default 3e-4 for lora/qlora, 1e-5 for full)",
    "warmup_ratio": "share of the steps warming up linearly before the cosine decay (default 0.01)",
    "weight_decay": "AdamW weight decay (default 0.1; biases not decayed)",
    "betas": "AdamW betas (default 0.9 0.95)",
    "grad_clip": "clip the gradient norm (default 1.0; 0: off)",
    "optimizer": "adamw, adamw8bit (torchao, CUDA) or auto (default: adamw8bit for full on CUDA, else adamw)",
    "lora_r": "LoRA rank (default 64)",
    "lora_alpha": "LoRA alpha (default 16)",
    "lora_dropout": "LoRA dropout (default 0.05)",
    "train_embeddings": "train wte and lm_head in full with LoRA (default: on for base models, off for chat "
                        "models and qlora, as finetune.py)",
    "save_steps": "checkpoint every N optimizer steps (default 0: none)",
    "resume": "continue from the newest complete checkpoint in --output",
    "seed": "seed of the data order, LoRA init and dropout (default 42)",
    "gradient_checkpointing": "recompute each block in backward to save memory (default on)",
    "dtype": "auto (default: bf16 on GPUs that have it, else fp16; fp32 on the CPU), bf16, fp16 or fp32",
    "device": "cuda, cuda:1, cpu (default: cuda when available; torchrun processes take their LOCAL_RANK GPU)",
    "eval_data": "held-out files: their loss after each epoch",
    "sharding": "with many processes: ddp, fsdp (FSDP2), or auto (default: fsdp for full, ddp for lora/qlora)",
    "progress": "show the progress bar (default on)",
    "deepspeed": "an official DeepSpeed config (ds_config_zero2/3.json): ZeRO-3 -> --sharding fsdp, 0-2 -> ddp, "
                 "an enabled bf16/fp16 -> --dtype; the rest is ignored (listed)",
}


def add_arguments(parser) -> None:
    import argparse
    defaults = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        default = getattr(defaults, f.name)
        kw = {"help": _HELP[f.name], "dest": f.name}
        if f.name in ("model", "output"):
            kw["required"] = True
        elif f.name in ("data",):
            kw.update(required=True, nargs="+", metavar="FILE")
        elif f.name == "eval_data":
            kw.update(nargs="+", metavar="FILE", default=[])
        elif f.name == "betas":
            kw.update(nargs=2, type=float, metavar=("B1", "B2"), default=defaults.betas)
        elif f.name == "resume":
            kw.update(action="store_true")
        elif f.name in ("packing", "gradient_checkpointing", "progress", "train_embeddings"):
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kinds = {"max_len": int, "batch_tokens": int, "micro_batch": int, "grad_accum": int, "epochs": int,
                     "lora_r": int, "lora_alpha": int, "save_steps": int, "seed": int, "lr": float, "warmup_ratio": float,
                     "weight_decay": float, "grad_clip": float, "lora_dropout": float}
            kw.update(default=default, type=kinds.get(f.name, str))
        parser.add_argument(option(f.name), **kw)


def from_args(args) -> FinetuneConfig:
    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
