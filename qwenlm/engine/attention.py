"""The attention context the network calls (`ctx.attend(layer_idx, q, k, v)`) when it runs on the paged cache.

The runner sets the step's metadata (slot of every new token, and per sequence its query range, context
length and block table); `attend` stores the new K/V into the pool and computes attention:
- prefill: the batch is one flat row [1, T] of concatenated chunks; each chunk attends causally to its
  own tokens and, after a prefix-cache hit or an earlier chunk, to its cached prefix (bottom-right
  causal mask) through torch SDPA;
- decode: one token per sequence [B, 1]; the Triton paged kernel on CUDA (CUDA-graph safe), the torch
  reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenlm.kernels.attention import (paged_decode_attention, paged_decode_attention_ref, paged_store_decode,
                                     triton)


@dataclass
class PrefillSeq:
    q_start: int  # offset of the chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens attended to: cached prefix + this chunk
    ctx_slots: torch.Tensor | None  # [ctx_len] pool slots of the whole context, None when nothing is cached


class PagedAttention:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: str = "auto"):
        # k_cache / v_cache: [layers, num_blocks, block_size, heads, head_dim]
        self.k_cache, self.v_cache = k_cache, v_cache
        if backend == "auto":
            backend = "triton" if (k_cache.is_cuda and triton is not None) else "torch"
        self.backend = backend
        self.is_prefill = True
        self.slot_mapping: torch.Tensor | None = None  # [N] slot of each new token; None = store nothing
        self.prefill_seqs: list[PrefillSeq] = []
        self.block_tables: torch.Tensor | None = None  # decode: [B, W] int32
        self.context_lens: torch.Tensor | None = None  # decode: [B] int32
        self.max_context_len = 0  # decode, torch backend: host-side bound of the gather
        self.fused_decode = False  # decode through the one custom op (for torch.compile'd decode)

    def set_prefill(self, slot_mapping, seqs: list[PrefillSeq]) -> None:
        self.is_prefill, self.slot_mapping, self.prefill_seqs = True, slot_mapping, seqs

    def set_decode(self, slot_mapping, block_tables, context_lens, max_context_len: int) -> None:
        self.is_prefill = False
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens
        self.max_context_len = max_context_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, H, D = q.shape
        if self.fused_decode and not self.is_prefill:
            out = paged_store_decode(q[:, 0], k[:, 0], v[:, 0], self.k_cache, self.v_cache, layer, self.slot_mapping,
                                     self.block_tables, self.context_lens, self.backend == "triton")
            return out[:, None]
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if self.slot_mapping is not None:
            k_cache.view(-1, H, D).index_copy_(0, self.slot_mapping, k.reshape(-1, H, D))
            v_cache.view(-1, H, D).index_copy_(0, self.slot_mapping, v.reshape(-1, H, D))
        if not self.is_prefill:
            if self.backend == "triton":
                out = paged_decode_attention(q[:, 0], k_cache, v_cache, self.block_tables, self.context_lens)
            else:
                out = paged_decode_attention_ref(q[:, 0], k_cache, v_cache, self.block_tables,
                                                 self.context_lens, self.max_context_len)
            return out[:, None]  # [B,1,h,d]
        out = torch.empty_like(q)
        for s in self.prefill_seqs:
            # 4-D [1,h,T,d] views: SDPA picks its flash / memory-efficient kernels only for 4-D inputs
            # (3-D ones fall back to the math kernel, which materialises the T x S scores).
            qs = q[:, s.q_start:s.q_start + s.q_len].transpose(1, 2)  # [1,h,T,d]
            if s.ctx_slots is None:
                ks = k[:, s.q_start:s.q_start + s.q_len].transpose(1, 2)
                vs = v[:, s.q_start:s.q_start + s.q_len].transpose(1, 2)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            else:
                ks = k_cache.view(-1, H, D)[s.ctx_slots][None].transpose(1, 2)  # [1,h,S,d]
                vs = v_cache.view(-1, H, D)[s.ctx_slots][None].transpose(1, 2)
                q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)[:, None]
                mask = torch.arange(s.ctx_len, device=q.device)[None, :] <= q_pos  # [T,S]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            out[:, s.q_start:s.q_start + s.q_len] = o.transpose(1, 2)
        return out
