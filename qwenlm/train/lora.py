"""LoRA through PEFT on our QWenLMHeadModel, with finetune.py's targets and defaults (spec §15).

PEFT wraps the official module names in place (`c_attn`, both `c_proj`, `w1`, `w2`), so the adapter it saves
has the key names of an adapter made by the official script on the official model
(`base_model.model.transformer.h.N.attn.c_attn.lora_A.weight`) and loads on either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from qwenlm.files import file_mode, save_safetensors
from qwenlm.train.config import FinetuneConfig

TARGET_MODULES = ["c_attn", "c_proj", "w1", "w2"]  # finetune.py's lora_target_modules; c_proj matches both
EMBEDDING_MODULES = ["wte", "lm_head"]  # finetune.py's modules_to_save for base models with plain LoRA


def lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(TARGET_MODULES), bias="none",
                      modules_to_save=list(EMBEDDING_MODULES) if cfg.embeddings_trained() else None)


def _has_gptq(model: nn.Module) -> bool:
    from qwenlm.model.quant import GPTQLinear
    return any(isinstance(m, GPTQLinear) for m in model.modules())


def apply_lora(model: nn.Module, cfg: FinetuneConfig):
    """The PeftModel around `model` (whose block linears gain LoRA layers in place); only LoRA (and, when
    asked, wte / lm_head) trainable. Adapter weights are kept in fp32 whatever the base dtype (PEFT's
    autocast_adapter_dtype), so small updates are not rounded away."""
    from peft import get_peft_model
    config = lora_config(cfg)
    if _has_gptq(model):  # Q-LoRA: PEFT's GPTQ LoRA layer around our GPTQLinear
        from qwenlm.train.qlora import register_gptq
        register_gptq(config)
    # task_type stays None while training: PEFT's causal-LM wrapper expects transformers' generation hooks,
    # which this network does not have; `save_adapter` writes the CAUSAL_LM type finetune.py writes.
    return get_peft_model(model, config)


def save_adapter(peft_model, folder: str | Path, base_model: str | None = None, state: dict | None = None) -> Path:
    """PEFT's own files (adapter_config.json, adapter_model.safetensors) in `folder`, written into a temporary
    folder first and moved into place file by file, so a crash never leaves a half-written adapter.

    The config says task_type CAUSAL_LM and names the base folder, as finetune.py's adapters do, so
    `peft.AutoPeftModelForCausalLM.from_pretrained(folder)` finds the base model and the right class.

    state: the trainable weights gathered from FSDP shards (the model's own parameters are then only shards);
    they go through PEFT's own key mapping (`get_peft_model_state_dict`, what save_pretrained calls)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.adapter-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = peft_model.peft_config["default"]
    saved = config.task_type, config.base_model_name_or_path
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = str(Path(base_model).resolve()) if base_model else saved[1]
    try:
        # the embeddings, when trained, are saved whole as modules_to_save; PEFT's "auto" check of a resized
        # vocabulary would read the base config through transformers, which this model does not use
        if state is None:
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        else:
            from peft import get_peft_model_state_dict
            named = {f"base_model.model.{k}": v for k, v in state.items()}
            weights = get_peft_model_state_dict(peft_model, state_dict=named, save_embedding_layers=False)
            tmp.mkdir()
            save_safetensors({k: v.contiguous() for k, v in weights.items()}, tmp / "adapter_model.safetensors",
                             metadata={"format": "pt"})
            config.inference_mode = True  # as save_pretrained writes it
            try:
                config.save_pretrained(str(tmp))
            finally:
                config.inference_mode = False
        folder.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, file_mode())  # safetensors writes 0600; the user's umask decides, as for every file here
            os.replace(f, folder / f.name)
    finally:
        config.task_type, config.base_model_name_or_path = saved
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
