"""The decode (and prefill) forward compiled by regions: one block's code compiled once, reused by all 32 layers.

Compiling the whole 32-layer forward traces and compiles every layer (~135 s at the Qwen-7B shape).
Here each block is cut at the attention call into two regions, the same for every layer:
  attn_in:  ln_1 -> c_attn -> RoPE (-> LogN)                      [q, k, v]
  (ctx.attend: stores K/V into the paged pool and attends; eager, the Triton kernel)
  attn_out: x + c_proj(attn) -> ln_2 -> gate_up -> up * silu(gate)
  mlp_out:  x + c_proj(act)
plus a prologue (embedding, RoPE tables, LogN scale) and a head (ln_f, lm_head). The block modules are
arguments, so the compiled code is shared by all layers; the runner then captures the whole step in a
CUDA graph, so the breaks between regions cost nothing at replay.

Batch 1 gets its own static-shape compile with gpt-fast's Inductor settings: with
`coordinate_descent_tuning`, Inductor rewrites an M=1 matmul as a reduction and generates (and tunes)
a Triton GEMV for it, with the neighbouring pointwise work (bias, residual add, SiLU * up) fused in.
Larger batches share one dynamic-shape compile whose matmuls stay on cuBLAS. GPTQ Int4 models decode one
sequence through fused kernels instead (qwenlm.engine.fused_decode), with the prologue and head compiled.

Prefill (one flat row [1, T] of concatenated chunks, `prefill`) runs the same regions through a third
compile, dynamic in T alone: eager, each RMSNorm, RoPE and SiLU * up is a chain of fp32 kernels over [T, 4096]
tensors (about a fifth of a 2,048-token prefill on an H100); compiled, each chain is one kernel. Its
inputs always carry per-token RoPE rows and the LogN scale (exactly 1 up to seq_length), so one graph
serves every prefill of two tokens or more (T == 1 would be specialised by the compiler: the runner runs
those eagerly).

The math is the network's own (qwenlm/model/qwen.py: QWenLMHeadModel.forward, QWenBlock.forward and
QWenAttention.forward), split at `ctx.attend`; tests check it against the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.engine import fused_decode
from qwenlm.engine.fusion import GateUpMLP
from qwenlm.model.qwen import apply_rope, logn_scale

# gpt-fast's generate.py settings (see module docstring); fx_graph_cache keeps compiled graphs on disk so
# a second start of the engine on the same machine skips most of the compile.
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True}


def prologue(model, ids, pos, inv_freq, use_logn: bool):
    cfg = model.config
    freqs = pos[..., None].float() * inv_freq  # [B,1,r/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B,1,1,r]
    q_scale = logn_scale(pos, cfg.seq_length)[:, :, None, None] if (use_logn and cfg.use_logn_attn) else None
    return model.transformer.wte(ids), emb.cos(), emb.sin(), q_scale


def _linear(module, x):
    # A biased nn.Linear as matmul + add: Inductor turns an M=1 matmul into its own GEMV (with the bias add
    # fused) but leaves addmm to cuBLAS. Other modules (quantized layers) run as they are.
    if type(module) is nn.Linear and module.bias is not None:
        return F.linear(x, module.weight) + module.bias
    return module(x)


def attn_in(block, x, cos, sin, q_scale):
    attn = block.attn
    B, T, _ = x.shape
    q, k, v = _linear(attn.c_attn, block.ln_1(x)).split(attn.num_heads * attn.head_dim, dim=2)
    q = apply_rope(q.view(B, T, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rope(k.view(B, T, attn.num_heads, attn.head_dim), cos, sin)
    v = v.view(B, T, attn.num_heads, attn.head_dim)
    if q_scale is not None:
        q = q * q_scale.type_as(q)
    return q, k, v


def attn_out(block, x, out):
    B, T, _ = x.shape
    x = x + block.attn.c_proj(out.reshape(B, T, -1))
    mlp = block.mlp
    if isinstance(mlp, GateUpMLP):
        # Region ends at up * silu(gate): stored once, instead of being recomputed (exp and all) by every
        # program of the c_proj GEMV that Inductor would otherwise fuse it into.
        up, gate = mlp.gate_up(block.ln_2(x)).split(mlp.ffn_dim, dim=-1)
        return x, up * F.silu(gate)
    return x + mlp(block.ln_2(x)), None


def mlp_out(block, x, act):
    return x + block.mlp.c_proj(act)


def head(model, x):
    return model.logits(model.transformer.ln_f(x)[:, 0])


def _tokens(*tensors) -> None:
    """Mark dim 1 (tokens) of each [1, T, ...] tensor dynamic for the next compiled call."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_dynamic(t, 1)


class _Regions:
    def __init__(self, wrap):
        self.prologue, self.attn_in, self.attn_out, self.mlp_out, self.head = (
            wrap(f) for f in (prologue, attn_in, attn_out, mlp_out, head))


class CompiledDecode:
    """Callable (ids [B,1], pos [B,1], inv [B,1,r/2], use_logn) -> fp32 logits [B,V], as the runner's eager
    `_decode_forward`. backend: a torch.compile backend ("inductor"; "eager" in tests), None = no compile."""

    def __init__(self, model, ctx, backend: str | None = "inductor"):
        self.model, self.ctx = model, ctx
        opts = dict(INDUCTOR_OPTIONS) if backend == "inductor" else None

        def wrap(dynamic):
            if backend is None:
                return lambda f: f
            return lambda f: torch.compile(f, backend=backend, dynamic=dynamic, options=opts)

        self.static = _Regions(wrap(False))  # batch 1
        self.dynamic = _Regions(wrap(True))  # every other batch size, one compile
        # Prefill rows [1, T], T >= 2: static shapes except T, marked on every region input (_tokens). With
        # every dim dynamic, the compiler unifies T with any other size equal to it in the first call (the
        # head dim, the hidden size) and specialises on that, so a later T would compile again mid-serving.
        self.varlen = _Regions(wrap(False))
        # GPTQ Int4 models decode one sequence through fused kernels instead of the compiled blocks.
        self.fused = fused_decode.FusedInt4Blocks(model) if (
            backend is not None and fused_decode.supports(model)) else None

    def _blocks(self, r: _Regions, ctx, ids, pos, inv, use_logn: bool) -> torch.Tensor:
        mark = _tokens if r is self.varlen else (lambda *ts: None)
        mark(ids, pos, inv)
        x, cos, sin, q_scale = r.prologue(self.model, ids, pos, inv, use_logn)
        mark(x, cos, sin, q_scale)
        for block in self.model.transformer.h:
            q, k, v = r.attn_in(block, x, cos, sin, q_scale)
            out = ctx.attend(block.attn.layer_idx, q, k, v)
            mark(x, out)
            x, act = r.attn_out(block, x, out)
            if act is not None:
                mark(x, act)
                x = r.mlp_out(block, x, act)
            mark(x)
        return x

    def __call__(self, ids, pos, inv, use_logn: bool) -> torch.Tensor:
        r = self.static if ids.shape[0] == 1 else self.dynamic
        if r is self.static and self.fused is not None:
            return r.head(self.model, self.fused(self.ctx, *r.prologue(self.model, ids, pos, inv, use_logn)))
        return r.head(self.model, self._blocks(r, self.ctx, ids, pos, inv, use_logn))

    def prefill(self, ctx, ids, pos, inv) -> torch.Tensor:
        """Hidden states [1, T, H] before ln_f (as the blocks leave them) for ids, pos [1, T] (T >= 2) and
        per-token RoPE rows inv [1, T, r/2]; LogN is always applied (a factor of exactly 1 up to seq_length)."""
        assert ids.shape[0] == 1 and ids.shape[1] >= 2 and inv.shape[1] == ids.shape[1]
        return self._blocks(self.varlen, ctx, ids, pos, inv, True)
