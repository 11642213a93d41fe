"""The Qwen (v1) network in one file, with the official tensor names (spec §2-§6).

The attention *storage* is not part of the network: every layer hands its rotated q, k, v to an
attention context (`DenseKVCache` here, `PackedAttention` for training, the engine's paged cache
elsewhere) through `ctx.attend(layer_idx, q, k, v)`. Positions and NTK frequencies are inputs, so the
same module serves a left-padded batch, a flat varlen batch, a packed training batch and a CUDA-graph
decode step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale in the model dtype: the official order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha for a prompt of `length` tokens (spec §5.4): 1, 3, 7, 15, ... past seq_length."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rope_inv_freq(cfg: ModelConfig, alpha: float, device=None) -> torch.Tensor:
    """Inverse frequencies in fp32 for one NTK alpha, computed exactly as the official RotaryEmbedding."""
    dim = cfg.rotary_dim
    base = cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))  # [dim/2]


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query scale for 0-based positions (spec §6): log_{seq_length}(p+1) past seq_length, else 1."""
    n = (positions + 1).double()
    return torch.where(n > seq_length, torch.log(n) / math.log(seq_length), torch.ones_like(n)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE in fp32 over the first cos.shape[-1] dims; x [B,T,h,d], cos/sin [B,T,1,r]."""
    rot = cos.shape[-1]
    xf = x.float()
    xr, xpass = xf[..., :rot], xf[..., rot:]
    half = rot // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + rotated * sin
    if xpass.shape[-1]:
        out = torch.cat((out, xpass), dim=-1)
    return out.type_as(x)


class QWenAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        proj = cfg.kv_channels * cfg.num_attention_heads
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * proj, bias=True)  # always biased, even with no_bias
        self.c_proj = nn.Linear(proj, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x, cos, sin, q_scale, ctx):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim)  # [B,T,h,d]
        k = k.view(B, T, self.num_heads, self.head_dim)
        v = v.view(B, T, self.num_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if q_scale is not None:
            q = q * q_scale.type_as(q)  # LogN on queries only, after RoPE; keys stored unscaled
        out = ctx.attend(self.layer_idx, q, k, v)  # [B,T,h,d]
        return self.c_proj(out.reshape(B, T, -1))


class QWenMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=not cfg.no_bias)  # "up"
        self.w2 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=not cfg.no_bias)  # "gate", through SiLU
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg, layer_idx)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x, cos, sin, q_scale, ctx):
        x = x + self.attn(self.ln_1(x), cos, sin, q_scale, ctx)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(QWenBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class QWenLMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = QWenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict[tuple[float, str], torch.Tensor] = {}

    def inv_freq(self, alphas: list[float], device) -> torch.Tensor:
        """Per-row RoPE inverse frequencies [len(alphas), 1, rotary_dim/2] for the given NTK alphas."""
        rows = []
        for a in alphas:
            key = (float(a), str(device))
            if key not in self._inv_freq:
                self._inv_freq[key] = rope_inv_freq(self.config, a, device)
            rows.append(self._inv_freq[key])
        return torch.stack(rows)[:, None, :]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx, inv_freq: torch.Tensor,
                use_logn: bool | None = None) -> torch.Tensor:
        """Hidden states after ln_f, [B,T,H].

        input_ids, positions: [B,T] (positions are 0-based token indices within each sequence);
        inv_freq: [B or 1, T or 1, rotary_dim/2] fp32 (see `inv_freq`); use_logn: apply LogN scaling
        (None = when any position is past seq_length, as the official code does at inference).
        """
        cfg = self.config
        freqs = positions[..., None].float() * inv_freq  # [B,T,r/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B,T,1,r]
        cos, sin = emb.cos(), emb.sin()
        q_scale = None
        if cfg.use_logn_attn and use_logn is not False:
            if use_logn or int(positions.max()) + 1 > cfg.seq_length:
                q_scale = logn_scale(positions, cfg.seq_length)[:, :, None, None]  # [B,T,1,1]
        x = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            x = block(x, cos, sin, q_scale, ctx)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on just the positions the caller needs, in fp32."""
        return self.lm_head(hidden).float()


class DenseKVCache:
    """Contiguous K/V per layer, [B,S,h,d], with a key-validity mask for left-padded batches.

    Causality is bottom-right aligned, so a chunk appended to a non-empty cache is masked correctly
    (the official SDPA path only handles an empty cache or one-token steps, spec §3.4).
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None  # [B,S] bool, True for real tokens
        self._mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1]

    def begin(self, new_valid: torch.Tensor) -> None:
        """Call before each forward with the validity [B,T] of the tokens about to be appended."""
        past = self.length
        self.valid = new_valid if self.valid is None else torch.cat((self.valid, new_valid), dim=1)
        B, T = new_valid.shape
        S = past + T
        if bool(self.valid.all()):
            self._mask = None  # fast path: plain causal (or no mask for a 1-token step)
            self._causal = T > 1
            return
        q_pos = torch.arange(past, S, device=new_valid.device)[:, None]
        k_pos = torch.arange(S, device=new_valid.device)[None, :]
        causal = k_pos <= q_pos  # [T,S]
        # A padded query attends to itself only, so its row stays finite and never feeds NaNs onward.
        self._mask = causal & (self.valid[:, None, None, :] | (k_pos == q_pos))  # [B,1,T,S]
        self._causal = False

    def attend(self, layer: int, q, k, v):
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=1)
            v = torch.cat((self.v[layer], v), dim=1)
        self.k[layer], self.v[layer] = k, v
        T, S = q.shape[1], k.shape[1]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,h,T|S,d]
        if self._mask is not None:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=self._mask)
        elif self._causal and T == S:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        elif self._causal:
            q_pos = torch.arange(S - T, S, device=q.device)[:, None]
            mask = torch.arange(S, device=q.device)[None, :] <= q_pos
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2)  # [B,T,h,d]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences dropped)."""
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]
        self.valid = self.valid[rows]


class PackedAttention:
    """Causal attention that never crosses a sample boundary, for packed training batches.

    `segment_ids` [B,T] numbers the samples within each row (pads may share the last sample's id: they
    come after it, so causality keeps real tokens from seeing them). Positions restarting per sample are
    passed to `forward` as usual. The block-diagonal mask goes through SDPA's attn_mask, which costs
    O(T^2) memory per row; a varlen/FlexAttention kernel can take its place without touching the model.
    """

    def __init__(self, segment_ids: torch.Tensor):
        B, T = segment_ids.shape
        if bool((segment_ids == segment_ids[:, :1]).all()):
            self.mask = None  # one sample per row: plain causal, the fast SDPA path
            return
        causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # [T,T]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,T,T]
        self.mask = (same & causal)[:, None]  # [B,1,T,T]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> PackedAttention:
        """One packed row from sample boundaries [0, n1, n1+n2, ..., T] (flash-attn varlen style)."""
        lengths = torch.diff(cu_seqlens.long())
        segment_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)  # [T]
        return cls(segment_ids[None, :])

    def attend(self, layer: int, q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,h,T,d]
        if self.mask is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=self.mask)
        return out.transpose(1, 2)  # [B,T,h,d]
