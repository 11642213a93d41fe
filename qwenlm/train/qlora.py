"""Q-LoRA: LoRA adapters trained on a frozen GPTQ Int4/Int8 model (the official Qwen-*-Chat-Int4 folders).

The base layers stay packed (`qwenlm.model.quant.GPTQLinear`); gradients reach the adapters of earlier
layers through them because GPTQLinear passes grad_x = grad_out @ W with W dequantized per call. PEFT does
the rest: `register_gptq` maps GPTQLinear to PEFT's own LoRA layer for GPTQ linears (`GPTQLoraLinear`, the
one PEFT uses for AutoGPTQ/GPTQModel layers: base output plus lora_B(lora_A(dropout(x))) * scaling, never a
merged weight), so the adapter's parameters, names and saved files are exactly PEFT's.

Compute precision differs from the official recipe on purpose. The official Q-LoRA is fp16 only ("use
--fp16 instead of --bf16 due to autogptq": AutoGPTQ's CUDA kernels take fp16 inputs only), which needs loss
scaling and can overflow. Our kernels dequantize in fp32 and round once into the input's dtype, so
`prepare_qlora` runs the network in bf16 wherever the GPU has it (fp16 on older GPUs, fp32 on CPU). The
GPTQ scales are left as stored (fp16): rounding them to bf16 would change the quantized weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qwenlm.model.quant import GPTQLinear


def register_gptq(lora_config) -> None:
    """Let `peft.get_peft_model(model, lora_config)` wrap GPTQLinear layers (call before it)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lora_config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    # PEFT warns about every layer type it does not know by name, though it reads GPTQLinear's in/out features
    warnings.filterwarnings("ignore", message=f"Unsupported layer type '{GPTQLinear}'", category=UserWarning)


def qlora_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that have it, else fp16; fp32 on CPU (no fast half-precision matmul there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def prepare_qlora(model: nn.Module, dtype: torch.dtype | None = None) -> torch.dtype:
    """Freeze every base weight and cast the unquantized ones (wte, norms, lm_head, GPTQ biases) to the
    compute dtype (default `qlora_compute_dtype`); returns it. Call on the GPTQ model loaded in the dtype
    its folder stores (dtype "auto": fp16 for the official ones, so the scales stay exact), before
    `peft.get_peft_model`. This is what PEFT's `prepare_model_for_kbit_training` does for bitsandbytes
    models, minus its fp32 upcast of the unquantized weights: in bf16 there is no overflow to guard
    against, and fp32 copies of wte and lm_head would cost 2.5 GB at the 7B shape."""
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    if not layers:
        raise ValueError("prepare_qlora needs a GPTQ model (a folder whose config.json has quantization_config); "
                         "use plain LoRA for a bf16/fp16 model")
    dtype = dtype or qlora_compute_dtype(layers[0].qweight.device)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for layer in layers:
        if layer.bias is not None:
            layer.bias = layer.bias.to(dtype)
            if layer._kernel_bias is not None:  # the Triton path's view of the same (nonzero) bias
                layer._kernel_bias = layer.bias
    model.dtype = dtype
    return dtype
