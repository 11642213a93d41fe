"""Weight-only quantized linears (official GPTQ Int4/Int8 checkpoints, on-the-fly int8) and the int8 KV cache.

GPTQ tensors (spec §10.4, AutoGPTQ "cuda-old" layout) are kept exactly as stored; the loader fills them by
name. On CPU the forward dequantizes and runs a plain matmul. On CUDA `finalize` switches every layer to the
Triton kernels of `qwenlm.kernels.gptq_matmul`, after bringing act-order (desc_act) checkpoints to contiguous
groups.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from qwenlm.kernels import gptq_gemv, gptq_matmul as kernels
from qwenlm.kernels.gptq_matmul import unpack_cols, unpack_rows

log = logging.getLogger(__name__)

# AutoGPTQ's inside_layer_modules for QWenBlock, in its true-sequential order (spec §10.2).
SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
QUANTIZED_MODULES = tuple(name for group in SEQUENTIAL_GROUPS for name in group)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [K, N] in [0, 2^bits) -> int32 [K*bits/32, N]; lane j of row r is row r*(32/bits)+j at bit bits*j."""
    per = 32 // bits
    if values.shape[0] % per:
        raise ValueError(f"cannot pack {values.shape[0]} rows into int32 words of {per} {bits}-bit values")
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])  # [R, per, N]
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64).view(1, -1, 1)
    words = (v << shifts).sum(dim=1)  # lanes do not overlap, so the sum is a bitwise or
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret the top bit as the sign


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [G, N] -> int32 [G, N*bits/32], packed along the output dim (qzeros)."""
    return pack_rows(values.t(), bits).t().contiguous()


def dequantize_weight(qweight, qzeros, scales, g_idx, bits: int, dtype=torch.float32) -> torch.Tensor:
    """The dequantized weight transposed, W_T [K, N] = scales[g] * (q - (qzeros + 1)[g]) (spec §10.4)."""
    q = unpack_rows(qweight, bits)  # [K, N]
    z = unpack_cols(qzeros, bits) + 1  # [G, N]
    g = g_idx.long()
    return (scales.to(dtype)[g] * (q - z[g]).to(dtype)).to(dtype)


class GPTQLinear(nn.Module):
    """A GPTQ-quantized nn.Linear with the official tensor names: qweight, qzeros, scales, g_idx, bias."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 device=None, dtype=torch.float16):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"GPTQ bits={bits} is not supported (4 or 8)")
        per = 32 // bits
        if in_features % per or out_features % per:
            raise ValueError(f"GPTQ layer {in_features}x{out_features} is not a multiple of {per} for {bits}-bit packing")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if group_size > 0 else in_features
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend = "dequant"  # "triton" once finalized on CUDA
        self.perm = None  # input permutation that makes act-order groups contiguous
        self._kernel_bias = None
        self._workspace = None  # batch-1 split-K reduction buffers of the Triton GEMV

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W_T [K, N]; after an act-order `prepare_kernel` its rows are in the permuted (`self.perm`) order."""
        return dequantize_weight(self.qweight, self.qzeros, self.scales, self.g_idx,
                                 self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:  # act-order rows made contiguous (`prepare_kernel`); autograd scatters back
            x2 = x2.index_select(1, self.perm)
        if x.requires_grad and torch.is_grad_enabled():  # training through a frozen layer (Q-LoRA)
            out = _GPTQMatmul.apply(x2, self)
        else:
            out = self._matmul(x2)
        return out.view(*lead, self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] (columns in `self.perm` order after an act-order `prepare_kernel`) -> [M, N] with the bias."""
        if self.backend == "dequant":
            out = x2 @ self.dequantized_weight(x2.dtype)
            return out + self.bias.to(x2.dtype) if self.bias is not None else out
        return kernels.gptq_matmul(x2.contiguous(), self.qweight, self.qzeros, self.scales,
                                   self.group_size, self.bits, self._kernel_bias, workspace=self._workspace)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out [M, N] @ W [N, K]: W dequantized for this call and dropped after, never kept dense."""
        if self.backend == "dequant":
            w = self.dequantized_weight(grad_out.dtype)
        else:
            w = kernels.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size, self.bits,
                                        grad_out.dtype)
        return grad_out @ w.t()

    @torch.no_grad()
    def prepare_kernel(self) -> None:
        """Switch to the Triton kernels: make groups contiguous (act-order), drop an all-zero bias."""
        expected = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        if not torch.equal(self.g_idx.long(), expected):
            perm = torch.argsort(self.g_idx.long(), stable=True)
            if not torch.equal(self.g_idx.long()[perm], expected):
                log.warning("GPTQ g_idx is not a permutation of contiguous groups of %d; using the dequantize path",
                            self.group_size)
                return
            q = unpack_rows(self.qweight, self.bits)[perm]
            self.qweight = pack_rows(q, self.bits)
            self.g_idx = expected.to(torch.int32)
            self.perm = perm
        has_bias = self.bias is not None and bool(self.bias.any())
        self._kernel_bias = self.bias if has_bias else None
        if kernels.triton is not None and self.group_size % 32 == 0:
            self.backend = "triton"
            self._workspace = gptq_gemv.gemv_workspace(self.out_features, self.qweight.device)


class _GPTQMatmul(torch.autograd.Function):
    """A frozen GPTQ linear that passes gradients to its input: forward is the inference matmul, backward
    grad_x = grad_out @ W with W dequantized again (saving it from forward would keep a dense copy alive
    until backward, which is what quantization saves memory against). The packed weights, scales and bias
    are buffers and get no gradient."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return ctx.layer.input_grad(grad_out.contiguous()), None


@torch.no_grad()
def concat_gptq_linears(a: GPTQLinear, b: GPTQLinear) -> GPTQLinear:
    """One GPTQLinear computing [a(x), b(x)] (outputs concatenated): one weight stream and one launch for two
    linears of the same input (mlp.w1 and mlp.w2 -> a `gate_up`). Every output element is the same dot product
    with the same scale and zero as before. Both layers must share bits, group size, input size and g_idx
    (w1 and w2 see the same calibration inputs, so an act-order checkpoint gives them the same order), and
    be in the same state (both as loaded, or both after `prepare_kernel` with the same backend). The result
    takes their place: a and b are left as they are and can be dropped."""
    if (a.bits, a.group_size, a.in_features) != (b.bits, b.group_size, b.in_features):
        raise ValueError(f"cannot concatenate GPTQ layers with (bits, group_size, in_features) "
                         f"{(a.bits, a.group_size, a.in_features)} and {(b.bits, b.group_size, b.in_features)}")
    if not torch.equal(a.g_idx, b.g_idx) or a.backend != b.backend or (a.perm is None) != (b.perm is None) or (
            a.perm is not None and not torch.equal(a.perm, b.perm)):
        raise ValueError("cannot concatenate GPTQ layers with different g_idx, input order or kernel state")
    has_bias = a.bias is not None or b.bias is not None
    out = GPTQLinear(a.in_features, a.out_features + b.out_features, a.bits, a.group_size, bias=False,
                     device="meta", dtype=a.scales.dtype)

    def bias_of(m):
        return m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=a.scales.dtype,
                                                             device=a.scales.device)

    out.qweight = torch.cat((a.qweight, b.qweight), dim=1)
    out.qzeros = torch.cat((a.qzeros, b.qzeros), dim=1)  # packed along N; N of each is a multiple of 32/bits
    out.scales = torch.cat((a.scales, b.scales), dim=1)
    out.g_idx = a.g_idx.clone()
    out.bias = torch.cat((bias_of(a), bias_of(b))) if has_bias else None
    out.backend, out.perm = a.backend, a.perm
    if a._kernel_bias is not None or b._kernel_bias is not None:
        out._kernel_bias = out.bias
    if a.backend == "triton":
        out._workspace = gptq_gemv.gemv_workspace(out.out_features, a.qweight.device)
    return out


def _blocks(model):
    return model.transformer.h


def prepare_gptq(model: nn.Module, quantization_config: dict) -> None:
    """Swap the block linears for GPTQLinear buffers shaped as the checkpoint stores them (before loading)."""
    qc = quantization_config
    method = qc.get("quant_method", "gptq")
    if method != "gptq":
        raise ValueError(f"config.json quantization_config.quant_method is {method!r}; only 'gptq' is supported")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"config.json quantization_config.checkpoint_format {qc['checkpoint_format']!r} "
                         "is not supported (only the AutoGPTQ 'gptq' zero-1 format)")
    bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if bits not in (4, 8):
        raise ValueError(f"config.json quantization_config.bits is {bits}; only 4 and 8 are supported")
    for block in _blocks(model):
        for name in QUANTIZED_MODULES:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, attr)
            device = lin.weight.device
            setattr(parent, attr, GPTQLinear(lin.in_features, lin.out_features, bits, group_size,
                                             bias=True, device=device))  # every module stores a bias


def _gptq_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, GPTQLinear)]


def finalize(model: nn.Module, device, dtype) -> None:
    """After loading: on CUDA switch every GPTQ layer to the Triton kernels; on CPU keep the dequantize path."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if kernels.triton is None:
        log.warning("triton is not installed: GPTQ layers use the (slow) dequantize path")
        return
    for layer in _gptq_layers(model):
        layer.prepare_kernel()


@torch.no_grad()
def int8_linear_from_float(linear: nn.Linear) -> GPTQLinear:
    """Symmetric per-output-channel int8 (round to nearest), stored as an 8-bit GPTQ layer with one group."""
    w = linear.weight.detach().float()  # [N, K]
    N, K = w.shape
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)  # [N]
    q = (torch.round(w / scale[:, None]).clamp(-127, 127) + 128).to(torch.int32)  # zero point 128
    layer = GPTQLinear(K, N, 8, K, bias=linear.bias is not None, device=w.device, dtype=torch.float32)
    layer.qweight = pack_rows(q.t().contiguous(), 8)
    layer.qzeros = pack_cols(torch.full((1, N), 127, dtype=torch.int32, device=w.device), 8)  # stored zero-1
    layer.scales = scale[None, :].contiguous()  # fp32: per-channel scales are few, keep them exact
    if linear.bias is not None:
        layer.bias = linear.bias.detach().clone()
    return layer


def quantize_int8_(model: nn.Module) -> nn.Module:
    """In place: every nn.Linear inside the blocks becomes per-channel int8 (used by `--quantize int8`)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    for block in _blocks(model):
        for name in QUANTIZED_MODULES:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, attr)
            if isinstance(lin, nn.Linear):
                layer = int8_linear_from_float(lin)
                if on_cuda:
                    layer.prepare_kernel()
                setattr(parent, attr, layer)
    return model


QUANTIZE_METHODS = ("int8",)


def apply_quantize(model: nn.Module, method: str | None, source: str = "the checkpoint") -> nn.Module:
    """`qwenlm.load(..., quantize=method)`: None leaves the model as loaded; "int8" runs `quantize_int8_` on a
    bf16/fp16/fp32 model. A GPTQ folder is already quantized and is refused rather than quantized twice."""
    if method is None:
        return model
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize={method!r} is not supported; choose one of {', '.join(QUANTIZE_METHODS)} or None")
    if _gptq_layers(model):
        raise ValueError(f"quantize={method!r}: {source} is already GPTQ-quantized (config.json has "
                         "quantization_config); load it without quantize")
    return quantize_int8_(model)


# ---------------------------------------------------------------- int8 KV cache (spec §8)

def quantize_kv(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """Asymmetric uint8 per vector over the last dim (per token and head for K/V [..., head_dim]).

    The official math (`quantize_cache_v`, qmin=0, qmax=255): scale = (max-min)/255, zero = -min/scale,
    q = clamp(x/scale + zero, 0, 255) truncated toward zero (not rounded). Returns (q uint8 [..., d],
    scale [..., 1], zero [..., 1]). The official code keeps scale/zero in the model dtype; fp32 is the default
    here because a bf16 zero near 128 is only accurate to 0.5 of a step. A constant vector (max == min)
    gets a tiny scale instead of the official division by zero.
    """
    xf = x.float()
    fmax = xf.amax(dim=-1, keepdim=True)
    fmin = xf.amin(dim=-1, keepdim=True)
    scale = ((fmax - fmin) / 255).clamp(min=1e-8)
    zero = 0 - fmin / scale
    q = (xf / scale + zero).clamp(0, 255).to(torch.uint8)  # float->uint8 truncates toward zero
    return q, scale.to(scale_dtype), zero.to(scale_dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float16) -> torch.Tensor:
    """The official `dequantize_cache_torch`: scale * (q - zero), in `dtype`."""
    return (scale.float() * (q.float() - zero.float())).to(dtype)
