"""Batch-1 decode of GPTQ Int4 blocks in five launches per layer (qwenlm.kernels.gptq_fused):

  1. ln_1 -> c_attn (+ bias) -> RoPE on q and k -> LogN on q        [q | k | v]
  2. attention (ctx.attend: stores K/V into the paged pool and attends; sends gate_up's first weights into L2)
  3. x + c_proj(attn)
  4. ln_2 -> gate_up                                                 [up | gate]
  5. x + c_proj(up * silu(gate))

The compiled regions (qwenlm.engine.compiled_decode) run the same math in about ten kernels per layer, each
GEMV a separate Triton launch Inductor cannot fuse into; at batch 1 the step is a chain of small dependent
kernels whose fixed costs add up. Here the norms, RoPE, LogN, SiLU * up and residual adds ride inside the
GEMVs (1.12x the compiled regions at batch 1 on an H100, docs/performance-notes.md quantization run 8).
"""

from __future__ import annotations

import torch

from qwenlm.engine.attention import PagedAttention
from qwenlm.engine.fusion import GateUpMLP
from qwenlm.kernels.attention import SplitPartials
from qwenlm.kernels.gptq_fused import fusable, fused_int4_gemv
from qwenlm.model.quant import GPTQLinear

# MiB of gate_up's weights the decode attention sends into L2 (`paged_decode_attention(prefetch=)`): 0.5% more
# tok/s at 16 (docs/performance-notes.md, run 15), and 8 ~0.9% more than 16 since the GEMVs read 16-byte input rows
# (run 17).
PREFETCH_MB = 8


def supports(model) -> bool:
    """Every block is GPTQ Int4 on the Triton backend with a fused gate_up, RoPE covers whole heads, one rank."""
    cfg = model.config
    if cfg.rotary_dim != cfg.head_dim:
        return False
    if getattr(model, "tp_world", 1) > 1:
        # A split model's c_proj outputs are partial sums: the kernels add the residual before the all-reduce
        # would, so each rank would add it once (N times in all). The compiled regions run such a model.
        return False
    for block in model.transformer.h:
        mlp, attn = block.mlp, block.attn
        if not isinstance(mlp, GateUpMLP):
            return False
        linears = (attn.c_attn, attn.c_proj, mlp.gate_up, mlp.c_proj)
        if not all(isinstance(m, GPTQLinear) and fusable(m) for m in linears):
            return False
        if mlp.ffn_dim % 64:
            return False  # gate_up's column blocks hold matching halves of up and gate
    return True


class FusedInt4Blocks:
    """Callable (ctx, x [1, 1, H], cos [1, 1, 1, r], sin, q_scale [1, 1, 1, 1] or None) -> x after every block,
    for one sequence, attending through ctx (the engine's PagedAttention)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ctx, x, cos, sin, q_scale) -> torch.Tensor:
        H = x.shape[-1]
        x = x.reshape(H)
        cos, sin = cos.reshape(-1), sin.reshape(-1)
        qs = q_scale.reshape(1) if q_scale is not None else None
        for block in self.model.transformer.h:
            attn, mlp = block.attn, block.mlp
            proj = attn.num_heads * attn.head_dim
            qkv = fused_int4_gemv(x, attn.c_attn, norm_weight=block.ln_1.weight, eps=block.ln_1.eps,
                                  rope=(cos, sin, qs, 2 * proj, proj, attn.head_dim))
            q, k, v = qkv.view(1, 1, 3, attn.num_heads, attn.head_dim).unbind(2)
            if isinstance(ctx, PagedAttention):
                # The attention hands c_proj its context splits uncombined (`SplitPartials`) where it splits, and
                # c_proj's programs combine them as they read their inputs: no arrival count and no combination
                # at the attention's end.
                out = ctx.attend(attn.layer_idx, q, k, v, prefetch=(mlp.gate_up.qweight, PREFETCH_MB << 20),
                                 partials=True)
            else:
                out = ctx.attend(attn.layer_idx, q, k, v)
            x = fused_int4_gemv(out if isinstance(out, SplitPartials) else out.reshape(-1), attn.c_proj,
                                residual=x).view(H)
            act = fused_int4_gemv(x, mlp.gate_up, norm_weight=block.ln_2.weight, eps=block.ln_2.eps,
                                  glu=mlp.ffn_dim)
            x = fused_int4_gemv(act, mlp.c_proj, residual=x).view(H)
        return x.view(1, 1, H)
