"""Model transforms applied at engine build time, from outside the network (gpt-fast / nano-vllm style).

`fuse_gate_up(model)` swaps every `QWenMLP` (w1 "up", w2 "gate", c_proj) for `GateUpMLP`, whose one
`gate_up` linear holds [w1; w2] stacked along the output dim: one weight read and one launch instead of
two per layer (the GEMV of a decode step is bound by reading weights, and small GEMVs reach a smaller
share of the memory bandwidth than large ones). Each output element is the same dot product as before.

The official tensor names survive the swap: loading a state dict with `mlp.w1.weight` / `mlp.w2.weight`
fills `gate_up`, and `state_dict()` hands back w1 / w2 (views of the halves), so checkpoints, the loader
and quantizers that read names keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.model.quant import GPTQLinear, concat_gptq_linears
from qwenlm.model.qwen import QWenMLP


class GateUpMLP(nn.Module):
    """c_proj(up * silu(gate)) with up, gate = gate_up(x).chunk(2): the same function as QWenMLP."""

    def __init__(self, gate_up: nn.Linear, c_proj: nn.Module):
        super().__init__()
        self.ffn_dim = gate_up.out_features // 2
        self.gate_up = gate_up
        self.c_proj = c_proj
        self._register_load_state_dict_pre_hook(self._load_official_names)
        self._register_state_dict_hook(_official_names)

    @classmethod
    def from_mlp(cls, mlp: QWenMLP) -> "GateUpMLP":
        w1, w2 = mlp.w1, mlp.w2
        bias = w1.bias is not None
        p = w1.weight
        fused = nn.Linear(w1.in_features, 2 * w1.out_features, bias=bias, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            fused.weight[:w1.out_features].copy_(w1.weight)
            fused.weight[w1.out_features:].copy_(w2.weight)
            if bias:
                fused.bias[:w1.out_features].copy_(w1.bias)
                fused.bias[w1.out_features:].copy_(w2.bias)
        fused.weight.requires_grad_(p.requires_grad)
        return cls(fused, mlp.c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up(x).split(self.ffn_dim, dim=-1)
        return self.c_proj(up * F.silu(gate))

    def _load_official_names(self, state_dict, prefix, *args):
        for kind in ("weight", "bias"):
            k1, k2 = f"{prefix}w1.{kind}", f"{prefix}w2.{kind}"
            if k1 in state_dict and k2 in state_dict:
                state_dict[f"{prefix}gate_up.{kind}"] = torch.cat((state_dict.pop(k1), state_dict.pop(k2)))


def _official_names(module: GateUpMLP, state_dict, prefix, local_metadata):
    for kind in ("weight", "bias"):
        key = f"{prefix}gate_up.{kind}"
        if key in state_dict:
            up, gate = state_dict.pop(key).split(module.ffn_dim)
            state_dict[f"{prefix}w1.{kind}"], state_dict[f"{prefix}w2.{kind}"] = up, gate
    return state_dict


def fuse_gate_up(model: nn.Module) -> int:
    """Replace each QWenMLP whose w1 and w2 are both plain nn.Linear, or both GPTQLinear, by a GateUpMLP.
    (A fused GPTQ layer's state_dict keeps the gate_up name: it is for inference, not for saving.)

    Layer by layer, so memory grows by at most one layer's w1 + w2 while it runs. Returns how many
    were fused (0 when already fused or quantized).
    """
    fused = 0
    for block in model.transformer.h:
        mlp = block.mlp
        if type(mlp) is QWenMLP and type(mlp.w1) is nn.Linear and type(mlp.w2) is nn.Linear:
            block.mlp = GateUpMLP.from_mlp(mlp)
        elif type(mlp) is QWenMLP and type(mlp.w1) is GPTQLinear and type(mlp.w2) is GPTQLinear:
            try:  # GPTQ Int4/Int8 (or on-the-fly int8): the packed columns are concatenated the same way
                block.mlp = GateUpMLP(concat_gptq_linears(mlp.w1, mlp.w2), mlp.c_proj)
            except ValueError:
                continue  # different g_idx or kernel state: keep the two launches
        else:
            continue
        del mlp
        fused += 1
    return fused
