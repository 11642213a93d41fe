"""Batch-1 decode: ln_1 -> c_attn -> RoPE -> LogN and the paged attention in one launch.

`fused_qkv_attention` runs `_fused_qkv_attention_kernel`: every program first does its share of the fused Int4
GEMV (`gptq_fused._fused_int4_kernel`, which writes q | k | v), then counts itself done and waits until all programs
are; then the programs take the attention's (head, context split) items in turn (`attention._mma_attend`, the
table's batch-1 mma program: one split per 64 cached positions, the new token's K/V stored into the pool by split
0, the last split of a head combining the partials). The wait is a spin on a count in global memory, which needs
every program resident at once: the grid is never larger than the GPU holds (`_resident`). The next kernel
(c_proj) starts as after the attention kernel, so a layer's decode loses one launch and one kernel boundary.

Under the Triton interpreter (programs run one after another) and where the GPU could not hold the grid, the two
phases run as two launches of the same kernel (PHASE 1, then 2): the same arithmetic, without the wait.
"""

from __future__ import annotations

import math

import torch

from qwenlm.kernels import gptq_fused
from qwenlm.kernels.gptq_int4 import triton

if triton is not None:
    import triton.language as tl

    from qwenlm.kernels.attention import _mma_attend
    from qwenlm.kernels.attention_splits import _span
    from qwenlm.kernels.gptq_fused import _fused_int4_kernel
    from qwenlm.kernels.sync import _fence_gpu, gdc_launch_dependents, gdc_wait

ATTN_BLOCK = 64  # positions per attention tile; one context split per ATTN_BLOCK cached positions
ATTN_SPLITS = 16  # at most

if triton is not None:

    @triton.jit
    def _fused_qkv_attention_kernel(
            x_ptr, nw_ptr, xs_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, res_ptr, cos_ptr,
            sin_ptr, qsc_ptr, N, K, FFN, eps, NBLK, P,
            Kc, Vc, AOut, PartM, PartL, PartAcc, Counters, BlockTables, ContextLens, Slots, Sync, scale,
            stride_kb, stride_kp, stride_kh, stride_bt,
            GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            STAGES: tl.constexpr, PRO: tl.constexpr, K_POW2: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
            ROPE_N: tl.constexpr, Q_N: tl.constexpr, LOGN: tl.constexpr, HEAD: tl.constexpr, ASM: tl.constexpr,
            FENCE: tl.constexpr, PDL: tl.constexpr,
            PAGE: tl.constexpr, HEADS: tl.constexpr, A_BLOCK: tl.constexpr, SPLITS: tl.constexpr,
            BLOCK_S: tl.constexpr, OP: tl.constexpr, PHASE: tl.constexpr):
        """PHASE 3: the GEMV, the wait, the attention; 1: the GEMV alone; 2: the attention alone (after 1)."""
        if PHASE != 2:
            _fused_int4_kernel(x_ptr, nw_ptr, xs_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                               res_ptr, cos_ptr, sin_ptr, qsc_ptr, N, K, FFN, eps, NBLK, P, GROUP, HAS_BIAS,
                               BLOCK_N, BLOCK_K, STAGES, PRO, K_POW2, GLU, RES, ROPE_N, Q_N, LOGN, HEAD, ASM, FENCE,
                               PDL)
            if PHASE == 3:  # this program's GEMV work, column-block epilogues included, is done and visible
                if FENCE:
                    _fence_gpu()
                tl.debug_barrier()
                tl.atomic_add(Sync, 1)  # acq_rel, gpu scope
        if PHASE != 1:
            if PHASE == 2 and PDL:  # the GEMV's launch: done and visible after this
                gdc_wait()
                gdc_launch_dependents()
            if PHASE == 3:  # wait for every program's (all are resident: `_resident`)
                seen = tl.load(Sync, volatile=True)
                while seen < P:
                    seen = tl.load(Sync, volatile=True)
                _fence_gpu()  # the epilogues' q | k | v are read after the count
            _, _, _, n_used = _span(ContextLens, 0, 0, SPLITS, A_BLOCK, True, True, A_BLOCK)
            for item in range(tl.program_id(0), HEADS * n_used, P):
                h = item // n_used
                _mma_attend(0, h, item - h * n_used, SPLITS, HEADS, h, out_ptr, Kc, Vc, Kc, Vc, out_ptr + Q_N,
                            out_ptr + 2 * Q_N, Slots, AOut, PartM, PartL, PartAcc, Counters, BlockTables,
                            ContextLens, scale, 0, HEAD, stride_kb, stride_kp, stride_kh, 0, 0, 0, 0, HEAD, 0, HEAD,
                            HEADS * HEAD, HEAD, stride_bt, PAGE, HEAD, A_BLOCK, False, True, True, OP, False, True,
                            A_BLOCK, BLOCK_S, ASM, FENCE, True)
            if PHASE == 3:  # the last program past its wait re-arms the counts for the next call
                tl.debug_barrier()
                if tl.atomic_add(Sync + 1, 1) == P - 1:
                    tl.store(Sync, 0)
                    tl.store(Sync + 1, 0)


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(registers, shared-memory bytes) per SM."""
    props = torch.cuda.get_device_properties(device)
    return (getattr(props, "regs_per_multiprocessor", 65536),
            getattr(props, "shared_memory_per_multiprocessor", 233472))


def _resident(n_regs: int, shared: int, warps: int, regs_sm: int, smem_sm: int) -> int:
    """Programs of a compiled kernel one SM holds at once (registers allocated per warp in 256s, 1 KiB of shared
    memory reserved per program, at most 2,048 threads)."""
    per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = regs_sm // max(per_warp * warps, 1)
    by_smem = smem_sm // (shared + 1024)
    return max(0, min(by_regs, by_smem, 2048 // (32 * warps), 32))


def fused_qkv_attention(x: torch.Tensor, layer, attention: dict, *, norm_weight, eps: float, rope,
                        config: tuple | None = None) -> torch.Tensor:
    """Attention output [1, heads, head_dim] of one decode step: the q | k | v of `gptq_fused.fused_int4_gemv(x,
    layer, norm_weight=, eps=, rope=)`, the new K/V stored into the pool and attended to as the last position.
    attention: k_cache / v_cache [blocks, page, heads, head_dim] (this layer's, bf16 or fp16), block_tables [1, W]
    int32, context_lens [1] int32 (the new token included), slots [1] (its pool slot), counters (int32 zeros, at
    least heads: `PagedAttention._split_counters`)."""
    grid, args, meta, qkv = gptq_fused.launch_args(x, layer, norm_weight=norm_weight, eps=eps, rope=rope,
                                                   config=config)
    kc, vc = attention["k_cache"], attention["v_cache"]
    _, page, heads, head = kc.shape
    assert kc.stride() == vc.stride() and kc.stride(-1) == 1 and kc.dtype in (torch.float16, torch.bfloat16)
    assert 3 * heads * head == layer.out_features and rope[5] == head and rope[4] == heads * head
    sync_buf = getattr(layer, "_attn_sync", None)
    if sync_buf is None or sync_buf.device != x.device:
        sync_buf = layer._attn_sync = torch.zeros(2, dtype=torch.int32, device=x.device)  # kept at zero
    out = torch.empty((1, heads, head), device=x.device, dtype=kc.dtype)
    part_m = torch.empty(heads * ATTN_SPLITS, device=x.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(heads * ATTN_SPLITS * head, device=x.device, dtype=torch.float32)
    tables = attention["block_tables"]
    att = (kc, vc, out, part_m, part_l, part_acc, attention["counters"], tables, attention["context_lens"],
           attention["slots"], sync_buf, 1.0 / math.sqrt(head), kc.stride(0), kc.stride(1), kc.stride(2),
           tables.stride(0))
    att_meta = dict(PAGE=page, HEADS=heads, A_BLOCK=ATTN_BLOCK, SPLITS=ATTN_SPLITS,
                    BLOCK_S=triton.next_power_of_2(ATTN_SPLITS), OP=tl.bfloat16 if kc.dtype == torch.bfloat16
                    else tl.float16)
    # num_stages 1: the attention's one tile per split gains nothing from a pipeline (the GEMV's loop sets its own)
    meta = {**meta, "num_stages": 1}
    programs = args[-1]
    if x.is_cuda and not gptq_fused.INTERPRET:
        kernel = _fused_qkv_attention_kernel.warmup(*args, *att, **meta, **att_meta, PHASE=3, grid=grid)
        kernel._init_handles()
        sms = gptq_fused._sm_count(x.device)
        fit = _resident(kernel.n_regs, kernel.metadata.shared, meta["num_warps"],
                        *_device_limits(x.device)) * sms
        if fit >= 1:
            programs = min(programs, fit)
            _fused_qkv_attention_kernel[(programs,)](*args[:-1], programs, *att, **meta, **att_meta, PHASE=3)
            return out
    for phase in (1, 2):  # the interpreter, or a grid the GPU cannot hold at once
        _fused_qkv_attention_kernel[(programs,)](*args[:-1], programs, *att, **meta, **att_meta, PHASE=phase)
    return out
