"""Launch settings of the paged decode kernels (`qwenlm.kernels.attention`): which kernel, context splits and tiles
run for a batch size and pool dtype, chosen from H100 sweeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeConfig:
    """How paged_decode_attention runs: kernel "v1" (one program per (sequence, head)), "v2" (per (sequence, head,
    context split)) or "mma" (v2's program with tensor-core products)."""
    kernel: str = "v2"
    splits: int = 1
    block_n: int = 128
    num_warps: int = 4
    num_stages: int | None = None
    min_chunk: int = 0  # with in-kernel combination: use only the splits that get >= min_chunk positions each


# Chosen per pool dtype and batch size from the H100 kernel sweeps (docs/performance-notes.md
# engine runs 5 and 6; contexts 640 / 2048, and 160 at batch 128): (smallest batch it applies from, config); the
# last entry whose batch <= B wins. Small batches split the context (one program per head leaves most of the GPU
# idle: bf16 batch 1, context 640: 48 -> 11 us). bf16: mma with 64-token tiles and 2 stages won at every batch
# (128 x 640: 455 us, 2.95 TB/s, vs 482 for v2). int8: the uint8 tiles are slower in v2 and mma than in v1
# from batch 16 on (128 x 640: v1 308 us, v2 380, mma 457), so int8 keeps v2 below 16 and v1 above, with
# small programs as the batch grows (one warp, 32-token tiles from 64: 128 x 640 in 258 us, 2.77 TB/s, vs 324
# with 4 warps and 128-token tiles: more programs resident per SM, more loads in flight). Batch 1 uses a split only
# per 64 positions of context (min_chunk): at context 16 one program per head, 4.3 us instead of 5.9 for 16 splits
# mostly empty; 80-272: 0.2 us less; 528 and 1,024 within 0.1 us (docs/performance-notes.md).
_MMA = dict(kernel="mma", block_n=64, num_stages=2)
DECODE_CONFIGS = {
    "bf16": [(1, DecodeConfig(splits=16, min_chunk=64, **_MMA)), (2, DecodeConfig(splits=8, **_MMA)),
             (4, DecodeConfig(splits=4, **_MMA)), (8, DecodeConfig(splits=2, **_MMA)), (16, DecodeConfig(**_MMA))],
    "int8": [(1, DecodeConfig(splits=16, block_n=64, min_chunk=64)), (2, DecodeConfig(splits=8, block_n=64)),
             (8, DecodeConfig(splits=4, block_n=64)), (16, DecodeConfig("v1", block_n=128, num_warps=2)),
             (32, DecodeConfig("v1", block_n=64, num_warps=1)), (64, DecodeConfig("v1", block_n=32, num_warps=1))],
}


# Batch 1 on a 16-bit pool when the splits are handed out uncombined (`paged_decode_attention(partials=True)`, the
# fused Int4 step): 32-position tiles, in the 16 splits (a split per 32 positions up to 512): +3.3% Int4 tok/s at
# prompt 16, +1.1% at 1,024, +0.3% at 3,072 against 64-position tiles; 16-position tiles or 32 splits were slower
# (docs/performance-notes.md, quantization run 18).
PARTIALS_BATCH1 = DecodeConfig(**{**_MMA, "block_n": 32}, splits=16)


def decode_config(batch: int, int8: bool, pool_dtype: torch.dtype = torch.bfloat16,
                  partials: bool = False) -> DecodeConfig:
    """The table's config for this batch (PARTIALS_BATCH1 for partials at batch 1 on a 16-bit pool); fp32 pools
    (fp32 models: tests, CPU-built checks) take v2 where the table says mma (tensor cores take 16-bit operands)."""
    if partials and batch <= 1 and not int8 and pool_dtype in (torch.bfloat16, torch.float16):
        return PARTIALS_BATCH1
    table = DECODE_CONFIGS["int8" if int8 else "bf16"]
    cfg = [c for b, c in table if b <= max(batch, 1)][-1]
    if cfg.kernel == "mma" and not int8 and pool_dtype not in (torch.bfloat16, torch.float16):
        cfg = DecodeConfig("v2", splits=cfg.splits, block_n=cfg.block_n, num_warps=cfg.num_warps,
                           min_chunk=cfg.min_chunk)
    return cfg
