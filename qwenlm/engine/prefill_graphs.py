"""CUDA graphs for short prompts: the prefill of one fresh prompt of up to 512 tokens replays a captured graph.

A short prompt's time to first token is the host's, not the GPU's: the prefill runs 32 layers of compiled regions
and attention calls, about a hundred Python calls that each check their guards and launch their kernels, which
takes longer than the GPU needs for 16 or 256 tokens (it reads the weights once: ~5 ms on an H100). Decode steps
hide that cost in CUDA graphs (runner.py); this does the same for the commonest prefill, one prompt alone with
nothing cached (or its cache hit recomputed): captured once per bucket of token counts (16, 32, ..., 512), the
prompt padded to its bucket.

Padding is exact: attention is causal within the chunk, so the real rows never see the padding rows that follow
them; the padding rows store their K/V into the scratch slot (as decode padding rows do) and their outputs are
dropped (only the last real row goes on to the lm_head). A short prompt after a prefix-cache hit runs here too, as
a fresh prompt: its cached rows are computed again and their K/V stored into the scratch slot, leaving the shared
blocks alone (`ModelRunner._recomputed_prefix`; a few hundred tokens cost the GPU less than the launches would
cost the host). Past 512 tokens the GPU's work outlasts the host's and the graph would only add padding, so
longer prompts (and batches of several chunks, and prompts that want prompt logprobs) run the compiled regions
directly.
"""

from __future__ import annotations

from typing import Callable

import torch

from qwenlm.engine.attention import PrefillSeq
from qwenlm.engine.tp_step import PrefillStep

BUCKETS = (16, 32, 64, 128, 256, 512)
# Activation bytes per prefill token that a captured graph keeps in its memory pool (the block's widest
# intermediates, bf16, the MLP's gate and up projections above all): about 200 KB at the Qwen-7B shape.
BYTES_PER_TOKEN_PER_HIDDEN = 48


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """The bucket sizes a runner whose prefills hold at most max_tokens tokens captures."""
    return [b for b in BUCKETS if b <= max_tokens]


def reserve_bytes(hidden_size: int, sizes: list[int]) -> int:
    """Memory the graphs' pool takes beyond the decode graphs' (kept out of the KV pool)."""
    return max(sizes) * hidden_size * BYTES_PER_TOKEN_PER_HIDDEN if sizes else 0


class PrefillGraphs:
    """Per bucket, a callable that runs the prefill of the tokens in the static inputs (a CUDA graph's replay on a
    GPU). `run(meta, packed)` returns what `ModelRunner.run_prefill` returns (the last row's logits [1, V] fp32 and
    no prompt rows), or None when the step does not qualify."""

    def __init__(self, runner, sizes: list[int]):
        self.runner, dev = runner, runner.device
        top = max(sizes) if sizes else 0
        self.flat = torch.zeros(4, top, dtype=torch.int64, device=dev)  # ids, positions, slots, RoPE-table rows
        self.padding = self.flat.clone()
        self.padding[2] = runner.scratch_slot  # padding rows store their K/V in the scratch slot
        self.last = torch.zeros(1, dtype=torch.int64, device=dev)  # the row that samples
        self.logits = torch.zeros(1, runner.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.no_rows = torch.zeros(0, runner.cfg.hidden_size, dtype=runner.dtype, device=dev)  # no prompt rows
        self.sizes = sizes
        self.replay: dict[int, Callable[[], None]] = {}

    def forward(self, size: int) -> None:
        """The prefill of the static inputs' first `size` columns into self.logits (what a graph captures)."""
        r, flat = self.runner, self.flat[:, :size]
        r.ctx.set_prefill(flat[2], [PrefillSeq(0, size, size, None)])
        inv = r._inv_table[flat[3]][None]  # [1, size, r/2]
        hidden = r._prefill_forward(r.ctx, flat[0][None], flat[1][None], inv, r.cfg.use_logn_attn, self.last)
        self.logits.copy_(r.model.logits(hidden))

    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool with each other and the decode graphs."""
        pool = self.runner.graph_pool  # the decode graphs'
        for size in reversed(self.sizes):
            self.flat.copy_(self.padding)
            self.forward(size)  # compile what this size needs and settle the allocator before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.forward(size)
            pool = graph.pool()
            self.replay[size] = graph.replay
        torch.cuda.synchronize()

    def run(self, meta: PrefillStep, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        T = meta.num_tokens
        size = next((b for b in self.sizes if b >= T), None)
        if (size not in self.replay or len(meta.seqs) != 1 or meta.seqs[0][3] or meta.num_rows != 1
                or meta.num_sampled != 1):
            return None
        self.flat[:, T:size].copy_(self.padding[:, T:size])
        self.flat[:, :T].copy_(packed[:4 * T].view(4, T))
        self.last.copy_(packed[4 * T:4 * T + 1])
        self.replay[size]()
        return self.logits, self.no_rows
