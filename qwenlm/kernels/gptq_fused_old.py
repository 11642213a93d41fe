"""Batch-1 GPTQ Int4 GEMVs with the work around them fused in: the decode step of a quantized block in four
GEMV launches (plus attention) instead of about ten.

`fused_int4_gemv` runs `_fused_int4_kernel`: the GEMV of `gptq_gemv._gemv_kernel_v4` (4 columns and a whole
group per thread, half2 unpacking, split-K reduced inside the kernel), with
- RMSNorm on the input (ln_1 / ln_2 before c_attn / gate_up): each program normalises the inputs of its own K
  blocks into an fp16 scratch row (programs sharing a K block write the same values there);
- an epilogue run by the last program of each column block: bias; NeoX RoPE on the q and k columns (a head's
  partner column lies in the same block) and the LogN query scale; up * silu(gate) for gate_up, whose column
  blocks take matching halves of up and gate, so the MLP's c_proj reads the activation as it is; or the
  residual add;
- the epilogue's operands loaded at the start, while the weights stream.
Measured and not kept (docs/benchmarks.md, quantization run 8): programmatic dependent launch (each GEMV
loading its first weight tile before waiting for the kernel before it), 0-20% slower through the engine, and an
L2 prefetch of the next GEMV's first weights, 7% slower.

Every intermediate is rounded to the model dtype where the network rounds it (qwenlm/model/qwen.py: RMSNorm,
the linear's output, apply_rope, q * q_scale, x + out, w1(x) * silu(w2(x))), so the result is the unfused
sequence up to the order of fp32 sums.
"""

from __future__ import annotations

import os

import torch

from qwenlm.kernels import sync
from qwenlm.kernels.gptq_gemv import gemv_config, triton

if triton is not None:
    import triton.language as tl

    from qwenlm.kernels.gptq_gemv import _w_dot, _w_tile
    from qwenlm.kernels.sync import _fence_gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _fused_int4_kernel(x_ptr, nw_ptr, xs_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                           res_ptr, cos_ptr, sin_ptr, qsc_ptr, N, K, FFN, eps,
                           GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, PRO: tl.constexpr,
                           K_POW2: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr, ROPE_N: tl.constexpr,
                           Q_N: tl.constexpr, LOGN: tl.constexpr, HEAD: tl.constexpr, ASM: tl.constexpr,
                           FENCE: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8
        SUB: tl.constexpr = GROUP // BLOCK_K
        DT = out_ptr.dtype.element_ty  # the model dtype
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        lane = tl.arange(0, BLOCK_N)
        if GLU:  # columns [up | gate] of width FFN: this block takes BLOCK_N/2 of each, the same features
            HALF: tl.constexpr = BLOCK_N // 2
            feat = pid_n * HALF + lane % HALF
            offs_n = tl.where(lane < HALF, feat, FFN + feat)
            n_mask = feat < FFN
        else:
            offs_n = pid_n * BLOCK_N + lane
            n_mask = offs_n < N
        rows = tl.arange(0, ROWS)[:, None]
        if PRO != 0:  # the first weight tile streams in while the prologue runs
            qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, pid_k, rows, offs_n, n_mask, N, ROWS, SUB)
        # The epilogue's operands are loaded now, while the weights stream: only the last program of the
        # column block uses them, but it no longer waits on these loads at the end.
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if RES:
            res = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ROPE_N > 0:
            d = offs_n % HEAD
            cos = tl.load(cos_ptr + d)
            sin = tl.load(sin_ptr + d)
            if LOGN:
                qs = tl.load(qsc_ptr + offs_n * 0).to(DT).to(tl.float32)
        if PRO == 0:  # fp16 inputs, read where they are: v4's pipelined loop
            x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for it in tl.range(pid_k, K // BLOCK_K, SPLIT_K, num_stages=STAGES):
                qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS, SUB)
                acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS, ASM, False)
        else:  # this program's inputs, as the network computes them, into an fp16 scratch row
            if PRO == 1:
                ka = tl.arange(0, K_POW2)
                xa = tl.load(x_ptr + ka, mask=ka < K, other=0.0).to(tl.float32)
                inv = 1.0 / tl.sqrt(tl.sum(xa * xa, 0) / K + eps)
            for it in range(pid_k, K // BLOCK_K, SPLIT_K):
                kb = it * BLOCK_K + tl.arange(0, BLOCK_K)
                if PRO == 1:  # RMSNorm: normalise in fp32, round, scale by the weight in the model dtype
                    xn = (tl.load(x_ptr + kb).to(tl.float32) * inv).to(DT).to(tl.float32)
                    v = (xn * tl.load(nw_ptr + kb).to(tl.float32)).to(DT)
                else:
                    v = tl.load(x_ptr + kb)
                tl.store(xs_ptr + kb, v.to(tl.float16))
            tl.debug_barrier()  # the scratch row is written before any thread of this program reads it
            x32 = xs_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            acc = _w_dot(qw, s, zlo, zhi, x32, pid_k, rows, ROWS, ASM, False)
            for it in tl.range(pid_k + SPLIT_K, K // BLOCK_K, SPLIT_K, num_stages=STAGES):
                qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS, SUB)
                acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS, ASM, False)
        if HAS_BIAS:
            if pid_k == 0:
                acc += bias
        # Split-K reduction (gptq_gemv._store_output's relaxed form): partial sums into a float32 workspace kept
        # at zero between calls; the last program of the column block finishes it.
        if ASM:
            tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
            if FENCE:
                _fence_gpu()
        else:
            tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel, gpu scope
        if arrived == SPLIT_K - 1:
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            t = tl.atomic_add(ws_ptr + offs_n, zero, mask=n_mask).to(DT).to(tl.float32)  # the linear's output
            out_n = offs_n
            keep = n_mask
            if GLU:  # w1(x) * silu(w2(x)): the up lanes take their gate from the other half of the block
                gate = tl.atomic_add(ws_ptr + offs_n + FFN, zero, mask=n_mask & (lane < HALF))
                gate = gate.to(DT).to(tl.float32)
                act = (gate / (1.0 + tl.exp(-gate))).to(DT).to(tl.float32)
                t = t * act
                out_n = feat
                keep = n_mask & (lane < HALF)
            if ROPE_N > 0:  # rotate-half RoPE over whole heads: the partner column is in this block
                first = d < HEAD // 2
                partner = tl.where(first, offs_n + HEAD // 2, offs_n - HEAD // 2)
                pt = tl.atomic_add(ws_ptr + partner, zero, mask=n_mask).to(DT).to(tl.float32)
                rot = tl.where(first, -pt, pt)
                roped = (t * cos + rot * sin).to(DT).to(tl.float32)
                if LOGN:
                    roped = tl.where(offs_n < Q_N, (roped * qs).to(DT).to(tl.float32), roped)
                t = tl.where(offs_n < ROPE_N, roped, t)
            if RES:
                t = t + res
            tl.store(out_ptr + out_n, t.to(DT), mask=keep)
            tl.debug_barrier()  # every partner read is done before the workspace is re-armed
            tl.store(ws_ptr + offs_n, zero, mask=n_mask)
            tl.store(cnt_ptr + pid_n, 0)


def fusable(layer) -> bool:
    """Whether a GPTQLinear can run through `fused_int4_gemv`: Int4 on the Triton backend, groups in order,
    official layout, whole power-of-two groups of at most 256, output a multiple of 128, a split-K workspace."""
    g = layer.group_size
    return (layer.bits == 4 and layer.backend == "triton" and layer.perm is None and layer.qweight.dim() == 2
            and layer._workspace is not None and g & (g - 1) == 0 and g <= 256 and layer.in_features % g == 0
            and layer.out_features % 128 == 0 and layer.in_features % 128 == 0)


# Launch settings per (N, K) for the fused kernel: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); missing
# shapes take gptq_gemv's Int4 table entry with at least two splits (`bench/bench_fused.py` on an H100 found
# none faster at the Qwen-7B shapes, docs/benchmarks.md).
FUSED_CONFIGS: dict[tuple[int, int], tuple] = {}


def fused_config(n: int, k: int) -> tuple:
    if (n, k) in FUSED_CONFIGS:
        return FUSED_CONFIGS[(n, k)]
    block_n, block_k, split_k, warps, stages = gemv_config(4, n, k)[:5]
    return 128 * warps, block_k, max(2, split_k), warps, stages


def fused_int4_gemv(x: torch.Tensor, layer, *, norm_weight=None, eps: float = 0.0, glu: int = 0,
                    residual=None, rope=None, config: tuple | None = None) -> torch.Tensor:
    """[K] -> [1, N] in x's dtype through an Int4 GPTQLinear (`fusable`):
      norm_weight: the input is RMSNorm(x) * norm_weight (eps), else x itself;
      glu=F: the layer's outputs are [up | gate] of F each and the result is up * silu(gate), [1, F];
      residual: + residual [N];  rope=(cos [HEAD], sin [HEAD], q_scale or None, rope_n, q_n, head): RoPE on the
      columns < rope_n in heads of `head`, and the LogN scale on the columns < q_n."""
    K, N = layer.in_features, layer.out_features
    block_n, block_k, split_k, warps, stages = config or fused_config(N, K)
    while glu and glu % (block_n // 2) and warps > 1:  # gate_up's blocks: whole halves of up and gate
        block_n, warps = block_n // 2, warps // 2
    g = layer.group_size
    block_k = 1 << (max(8, min(block_k, g)).bit_length() - 1)
    split_k = max(2, min(split_k, K // block_k))
    assert block_n == 128 * warps and fusable(layer), "fused_int4_gemv: see fusable() and BLOCK_N = 128 x warps"
    assert not glu or (N == 2 * glu and glu % (block_n // 2) == 0), "glu: N = 2F, F a multiple of 64"
    x = x.reshape(-1)
    assert x.is_contiguous() and x.numel() == K
    out = torch.empty((1, glu or N), device=x.device, dtype=x.dtype)
    # prologue: 0 fp16 inputs read in place; 1 RMSNorm into an fp16 scratch row; 2 other dtypes converted into it
    pro = 1 if norm_weight is not None else (0 if x.dtype == torch.float16 else 2)
    scratch = torch.empty(K, device=x.device, dtype=torch.float16) if pro else x
    ws, cnt = layer._workspace
    bias = layer._kernel_bias
    cos = sin = q_scale = None
    rope_n = q_n = 0
    head = 128
    if rope is not None:
        cos, sin, q_scale, rope_n, q_n, head = rope
        assert rope_n % head == 0 and block_n % head == 0 and cos.numel() == head and not glu
    assert not (glu and residual is not None), "glu and residual: one epilogue or the other"
    any_ptr = layer.scales
    grid = (triton.cdiv(glu, block_n // 2) if glu else triton.cdiv(N, block_n), split_k)
    _fused_int4_kernel[grid](
        x, norm_weight if norm_weight is not None else any_ptr, scratch, layer.qweight, layer.qzeros,
        layer.scales, bias if bias is not None else any_ptr, out, ws, cnt,
        residual if residual is not None else any_ptr, cos if cos is not None else any_ptr,
        sin if sin is not None else any_ptr, q_scale if q_scale is not None else any_ptr, N, K, glu, eps,
        GROUP=g, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, STAGES=stages,
        PRO=pro, K_POW2=triton.next_power_of_2(K), GLU=glu > 0, RES=residual is not None, ROPE_N=rope_n, Q_N=q_n,
        LOGN=q_scale is not None, HEAD=head, ASM=not INTERPRET, FENCE=sync.PER_THREAD_FENCE, num_warps=warps,
        num_stages=stages)
    return out
