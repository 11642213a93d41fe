"""The attention context the network calls (`ctx.attend(layer_idx, q, k, v)`) when it runs on the paged cache.

The runner sets the step's metadata (slot of every new token, and per sequence its query range, context
length and block table); `attend` stores the new K/V into the pool and computes attention:
- prefill: the batch is one flat row [1, T] of concatenated chunks; each chunk attends causally to its
  own tokens and, after a prefix-cache hit or an earlier chunk, to its cached prefix (bottom-right
  causal mask) through torch SDPA;
- decode: one token per sequence [B, 1]; on CUDA the Triton paged kernel, which also stores the new K/V
  (CUDA-graph safe), the torch reference elsewhere.

With an int8 KV cache (`EngineConfig(kv_cache_dtype="int8")`) the pools are uint8 with a float32 (scale, zero)
per token and head (spec §8 math, `qwenlm.model.quant.quantize_kv`): new K/V are quantized as they are stored,
the decode kernel dequantizes as it reads, and prefill attends to the dequantized stored rows of its whole
context (the new chunk included, as the official code does), so chunked, unchunked and prefix-cached prefills
see the same keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenlm.kernels.attention import SplitPartials, paged_decode_attention, paged_decode_attention_ref, triton
from qwenlm.kernels.kv_int8 import dequantize_rows, quantize_store_kv

KV_CACHE_DTYPES = ("auto", "int8")


def kv_bytes_per_token_head(head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes of K and V of one token and head in the pool: 2*d*itemsize, or 2*(d + 8) for int8 (fp32 scale, zero)."""
    if kv_cache_dtype == "int8":
        return 2 * (head_dim + 2 * 4)
    return 2 * head_dim * dtype.itemsize


@dataclass
class PrefillSeq:
    q_start: int  # offset of the chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens attended to: cached prefix + this chunk
    ctx_slots: torch.Tensor | None  # [ctx_len] pool slots of the whole context, None when nothing is cached


class PagedAttention:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend: str = "auto",
                 k_sz: torch.Tensor | None = None, v_sz: torch.Tensor | None = None):
        # k_cache / v_cache: [layers, num_blocks, block_size, heads, head_dim] in the model dtype, or uint8 with
        # k_sz / v_sz [layers, num_blocks, block_size, heads, 2] float32 (scale, zero) for an int8 cache.
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_sz, self.v_sz = k_sz, v_sz
        self.int8 = k_sz is not None
        if backend == "auto":
            backend = "triton" if (getattr(k_cache, "is_cuda", False) and triton is not None) else "torch"
        self.backend = backend
        self.is_prefill = True
        self.slot_mapping: torch.Tensor | None = None  # [N] slot of each new token; None = store nothing
        self.prefill_seqs: list[PrefillSeq] = []
        self.block_tables: torch.Tensor | None = None  # decode: [B, W] int32
        self.context_lens: torch.Tensor | None = None  # decode: [B] int32
        self.max_context_len = 0  # decode, torch backend: host-side bound of the gather
        self._counters: torch.Tensor | None = None  # the decode kernels' split counters (`_split_counters`)

    @classmethod
    def allocate(cls, shape: tuple, dtype: torch.dtype, kv_cache_dtype: str, device, backend: str = "auto"):
        """Zeroed pools of `shape` [layers, blocks, block_size, heads, head_dim] ("auto": the model dtype)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        if kv_cache_dtype == "auto":
            return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                       backend)
        sz_shape = (*shape[:-1], 2)
        return cls(torch.zeros(shape, dtype=torch.uint8, device=device),
                   torch.zeros(shape, dtype=torch.uint8, device=device), backend,
                   torch.zeros(sz_shape, dtype=torch.float32, device=device),
                   torch.zeros(sz_shape, dtype=torch.float32, device=device))

    def set_prefill(self, slot_mapping, seqs: list[PrefillSeq]) -> None:
        self.is_prefill, self.slot_mapping, self.prefill_seqs = True, slot_mapping, seqs

    def set_decode(self, slot_mapping, block_tables, context_lens, max_context_len: int) -> None:
        self.is_prefill = False
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens
        self.max_context_len = max_context_len

    def _split_counters(self, q: torch.Tensor) -> torch.Tensor | None:
        """Zeroed int32 arrival counters (one per sequence and head) with which the decode kernel's last context
        split combines the partials itself (`paged_decode_attention(counters=)`); the kernels leave them zero.
        Grown outside CUDA-graph capture only: the runner runs every batch size once before capturing it (None
        otherwise: a second launch combines the splits)."""
        n = q.shape[0] * q.shape[2]
        if self._counters is None or self._counters.numel() < n:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            self._counters = torch.zeros(n, dtype=torch.int32, device=q.device)
        return self._counters

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               prefetch: tuple | None = None, partials: bool = False):
        """prefetch: (tensor, nbytes) of `paged_decode_attention`, for a decode step on a Triton bf16 or fp16 pool;
        partials: the same (a decode step may then return `SplitPartials` instead of the output)."""
        B, T, H, D = q.shape
        if self.int8:
            return self._attend_int8(layer, q, k, v)
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if not self.is_prefill and self.backend == "triton" and self.slot_mapping is not None:
            # the kernel stores the new K/V itself (no separate store launches)
            out = paged_decode_attention(q[:, 0], k_cache, v_cache, self.block_tables, self.context_lens,
                                         k_new=k[:, 0], v_new=v[:, 0], slots=self.slot_mapping,
                                         counters=self._split_counters(q), prefetch=prefetch, partials=partials)
            return out if isinstance(out, SplitPartials) else out[:, None]
        if self.slot_mapping is not None:
            k_cache.view(-1, H, D).index_copy_(0, self.slot_mapping, k.reshape(-1, H, D))
            v_cache.view(-1, H, D).index_copy_(0, self.slot_mapping, v.reshape(-1, H, D))
        if not self.is_prefill:
            if self.backend == "triton":
                out = paged_decode_attention(q[:, 0], k_cache, v_cache, self.block_tables, self.context_lens,
                                             counters=self._split_counters(q))
            else:
                out = paged_decode_attention_ref(q[:, 0], k_cache, v_cache, self.block_tables,
                                                 self.context_lens, self.max_context_len)
            return out[:, None]  # [B,1,h,d]
        return self._prefill(q, k, v, lambda slots: (k_cache.view(-1, H, D)[slots], v_cache.view(-1, H, D)[slots]))

    def _prefill(self, q, k, v, gather) -> torch.Tensor:
        """Each chunk attends causally to its context: its own rows k, v (for an int8 pool, as stored) and, after
        a prefix-cache hit or an earlier chunk, its cached prefix, whose K, V [S,h,d] gather(slots) reads."""
        out = torch.empty_like(q)
        H, D = q.shape[2:]
        seqs, i = self.prefill_seqs, 0
        while i < len(seqs):
            s = seqs[i]
            if s.ctx_slots is None:
                # A run of fresh chunks of one length (adjacent in the flat row): one causal SDPA over [G,h,L,d]
                # views. 4-D inputs: SDPA picks its flash / memory-efficient kernels only for those (3-D ones
                # fall back to the math kernel, which materialises the T x S scores).
                j = i + 1
                while j < len(seqs) and seqs[j].ctx_slots is None and seqs[j].q_len == s.q_len:
                    j += 1
                a, b, L = s.q_start, seqs[j - 1].q_start + s.q_len, s.q_len

                def rows(t):
                    return t[0, a:b].reshape(j - i, L, H, D).transpose(1, 2)

                o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True)
                out[0, a:b] = o.transpose(1, 2).reshape(b - a, H, D)
                i = j
                continue
            qs = q[:, s.q_start:s.q_start + s.q_len].transpose(1, 2)  # [1,h,T,d]
            kg, vg = gather(s.ctx_slots)
            ks, vs = kg[None].transpose(1, 2), vg[None].transpose(1, 2)  # [1,h,S,d]
            q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)[:, None]
            mask = torch.arange(s.ctx_len, device=q.device)[None, :] <= q_pos  # [T,S]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            out[:, s.q_start:s.q_start + s.q_len] = o.transpose(1, 2)
            i += 1
        return out

    def _attend_int8(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, H, D = q.shape
        use_triton = self.backend == "triton"
        kc, vc, ks, vs = self.k_cache[layer], self.v_cache[layer], self.k_sz[layer], self.v_sz[layer]
        if not self.is_prefill:
            if use_triton:  # quantizes and stores the new K/V itself
                new = {} if self.slot_mapping is None else dict(k_new=k[:, 0], v_new=v[:, 0], slots=self.slot_mapping)
                out = paged_decode_attention(q[:, 0], kc, vc, self.block_tables, self.context_lens, k_sz=ks, v_sz=vs,
                                             counters=self._split_counters(q), **new)
            else:
                quantize_store_kv(k, v, kc, vc, ks, vs, self.slot_mapping, use_triton)
                out = paged_decode_attention_ref(q[:, 0], kc, vc, self.block_tables, self.context_lens,
                                                 self.max_context_len, k_sz=ks, v_sz=vs)
            return out[:, None]
        if self.slot_mapping is not None:  # the chunk attends to its own rows as stored (dequantized)
            kd, vd = quantize_store_kv(k, v, kc, vc, ks, vs, self.slot_mapping, use_triton, dequantized=True)
            k, v = kd.view(k.shape), vd.view(v.shape)

        def gather(slots):
            return (dequantize_rows(kc.view(-1, H, D)[slots], ks.view(-1, H, 2)[slots], q.dtype),
                    dequantize_rows(vc.view(-1, H, D)[slots], vs.view(-1, H, 2)[slots], q.dtype))

        return self._prefill(q, k, v, gather)
