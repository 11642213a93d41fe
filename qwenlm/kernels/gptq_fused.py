"""Batch-1 GPTQ Int4 GEMVs with the work around them fused in: the decode step of a quantized block in four
GEMV launches (plus attention) instead of about ten.

`fused_int4_gemv` runs `_fused_int4_kernel`: the arithmetic of `gptq_int4._gemv_kernel_v4` (4 columns and a
whole group per thread, half2 unpacking) on a stream-K grid: a fixed number of programs (2 per SM, rounded down to
a multiple of the column blocks) each take an equal run of consecutive (column block, K tile) work units,
pipelined, and add their partial sums into a float32 workspace once per column block they touch. v4's grid
of a program per (column block, K split) gives each program 2 tiles at the Qwen-7B shapes, so all of them load,
then all compute; here the unpacking overlaps the next tiles' loads (4% more tok/s through the engine,
docs/performance-notes.md quantization run 12). Fused in:
- a prologue that writes the inputs of the program's own K tiles into an fp16 scratch row (programs sharing a K
  tile write the same values there), its first two weight tiles already loading: RMSNorm (ln_1 / ln_2 before
  c_attn / gate_up), the attention's context splits combined (`SplitPartials`, attn c_proj), or the inputs as they
  are (mlp c_proj: +1.6% tok/s against reading them in place, run 18). The row is written in the unpacking's
  lane-pair order (x0 x4 x1 x5 x2 x6 x3 x7 in each run of 8, a permutation in registers), so the loop reads the
  pairs as they are, one 16-byte row of them per load (+0.7% tok/s through the engine for the order against
  regrouping them in registers, docs/performance-notes.md run 16, and +2.6% for the 16-byte loads, run 17: a tile's
  copies into shared memory 21 instead of 45);
- an epilogue run by the program that completes a column block's K tiles: bias; NeoX RoPE on the q and k
  columns (a head's partner column lies in the same block) and the LogN query scale; up * silu(gate) for
  gate_up, whose column blocks take matching halves of up and gate, so the MLP's c_proj reads the activation
  as it is; or the residual add. The sums are read with relaxed atomics, all at once;
- the epilogue's operands loaded as a column block starts, while the weights stream;
- programmatic dependent launch on sm_90+ (`sync.pdl`): the first two weight tiles are loaded before waiting
  for the kernel before, and the next kernel may launch once they are summed (not at the start: 5% more tok/s
  through the engine, docs/performance-notes.md run 13).
Measured and not kept (docs/performance-notes.md): an L2 prefetch of the next GEMV's first weights, 7% slower (run 8);
the next RMSNorm's sum of squares added up by the GEMV writing x, ~1 µs less per norm alone, nothing measurable
through the engine (run 12); one pipelined loop over the run's units across column blocks (commit 20d0dd2), equal
without PDL and slower with it, and the first tiles prefetched into L2 instead of held in registers (commit
a66778d, PREF): fewer registers, slower with PDL (run 13).

Every intermediate is rounded to the model dtype where the network rounds it (qwenlm/model/qwen.py: RMSNorm,
the linear's output, apply_rope, q * q_scale, x + out, w1(x) * silu(w2(x))), so the result is the unfused
sequence up to the order of fp32 sums.
"""

from __future__ import annotations

import functools
import os

import torch

from qwenlm.kernels import sync
from qwenlm.kernels.attention import SplitPartials
from qwenlm.kernels.gptq_int4 import triton

if triton is not None:
    import triton.language as tl

    from qwenlm.kernels.gptq_int4 import _w_dot, _w_tile
    from qwenlm.kernels.sync import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _columns(cb, lane, N, FFN, BLOCK_N: tl.constexpr, GLU: tl.constexpr):
        """Column block cb's output columns, their mask, and (GLU) the features they hold: [up | gate] of width FFN,
        BLOCK_N/2 of each, the same features."""
        if GLU:
            feat = cb * (BLOCK_N // 2) + lane % (BLOCK_N // 2)
            return tl.where(lane < BLOCK_N // 2, feat, FFN + feat), feat < FFN, feat
        offs_n = cb * BLOCK_N + lane
        return offs_n, offs_n < N, offs_n

    @triton.jit
    def _read_sum(ptr, mask, ASM: tl.constexpr):
        """A float32 sum of the workspace, read at L2 (an atomic add of zero)."""
        zero = tl.zeros(ptr.shape, dtype=tl.float32)
        if ASM:
            return tl.atomic_add(ptr, zero, mask=mask, sem="relaxed")
        return tl.atomic_add(ptr, zero, mask=mask)

    @triton.jit
    def _fused_int4_kernel(x_ptr, nw_ptr, xs_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                           res_ptr, cos_ptr, sin_ptr, qsc_ptr, N, K, FFN, eps, NBLK, P,
                           GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PRO: tl.constexpr,
                           K_POW2: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr, ROPE_N: tl.constexpr,
                           Q_N: tl.constexpr, LOGN: tl.constexpr, HEAD: tl.constexpr, ASM: tl.constexpr,
                           PDL: tl.constexpr, SPLITS: tl.constexpr, RUN_MAX: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8
        SUB: tl.constexpr = GROUP // BLOCK_K
        DT = out_ptr.dtype.element_ty  # the model dtype
        pid = tl.program_id(0)
        KT = K // BLOCK_K  # K tiles per column block
        start = pid * (NBLK * KT) // P  # this program's run of work units t = column block * KT + K tile
        end = (pid + 1) * (NBLK * KT) // P
        lane = tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)[:, None]
        # the first two weight tiles stream in while the kernel before ends and the input row is built (the second
        # only used if the first segment has it)
        offs0, mask0, _ = _columns(start // KT, lane, N, FFN, BLOCK_N, GLU)
        first_len = tl.minimum(KT - start % KT, end - start)
        qw0, s0, zlo0, zhi0 = _w_tile(qw_ptr, qz_ptr, s_ptr, start % KT, rows, offs0, mask0, N, ROWS, SUB)
        qw1, s1, zlo1, zhi1 = _w_tile(qw_ptr, qz_ptr, s_ptr, tl.minimum(start % KT + 1, KT - 1), rows, offs0,
                                      mask0, N, ROWS, SUB)
        if PDL:  # weights are never written by a kernel; everything else is read after this
            gdc_wait()
        # The inputs go into an fp16 scratch row in the unpacking's lane-pair order (`_x_lane_pairs`), read by the
        # tiles.
        if PRO >= 2:  # this program's K tiles only (RUN_MAX of them at most), into the fp16 scratch row
            j = tl.arange(0, RUN_MAX * BLOCK_K)
            ka = ((start % KT + j // BLOCK_K) % KT) * BLOCK_K + j % BLOCK_K
            ok = j < tl.minimum(end - start, KT) * BLOCK_K
            if PRO == 2:  # the inputs as they are, in fp16
                xh = tl.load(x_ptr + ka, mask=ok, other=0.0).to(tl.float16)
            else:  # the attention's context splits (`SplitPartials`: x_ptr acc, nw_ptr max | sum), combined as
                # `attention_splits._combine_splits` does
                part = (ka // HEAD)[None, :] * SPLITS + tl.arange(0, SPLITS)[:, None]  # [SPLITS, J]: (head, split)
                pm = tl.load(nw_ptr + part, mask=ok[None, :], other=float("-inf"))
                pl = tl.load(nw_ptr + (K // HEAD) * SPLITS + part, mask=ok[None, :], other=0.0)
                pa = tl.load(x_ptr + part * HEAD + (ka % HEAD)[None, :], mask=ok[None, :], other=0.0)
                m_max = tl.max(pm, 0)
                w = tl.exp(pm - tl.where(m_max == float("-inf"), 0.0, m_max)[None, :])
                total = tl.sum(pl * w, 0)
                xh = (tl.sum(pa * w, 0) / tl.where(total > 0, total, 1.0)).to(DT).to(tl.float16)
            # lane-pair order within each run of 8, a permutation in registers
            xh = tl.reshape(tl.permute(tl.reshape(xh, [RUN_MAX * BLOCK_K // 8, 2, 4]), (0, 2, 1)), [RUN_MAX * BLOCK_K])
            tl.store(xs_ptr + ka, xh, mask=ok)
            tl.debug_barrier()  # the scratch row is written before any thread of this program reads it
            x32 = xs_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        else:  # RMSNorm (it needs the whole row) of this program's K tiles' inputs into an fp16 scratch row
            ka = tl.arange(0, K_POW2)
            xf = tl.load(x_ptr + ka, mask=ka < K, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)  # normalise in fp32, round, scale in the model dtype
            nw = tl.load(nw_ptr + ka, mask=ka < K, other=0.0).to(tl.float32)
            xa = ((xf * inv).to(DT).to(tl.float32) * nw).to(DT)
            # the K tiles of this program's run, from its first (a run of KT or more covers the row)
            need = ((ka // BLOCK_K - start % KT + KT) % KT) < tl.minimum(end - start, KT)
            xh = tl.reshape(tl.permute(tl.reshape(xa.to(tl.float16), [K_POW2 // 8, 2, 4]), (0, 2, 1)), [K_POW2])
            tl.store(xs_ptr + ka, xh, mask=(ka < K) & need)
            tl.debug_barrier()  # the scratch row is written before any thread of this program reads it
            x32 = xs_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        t = start
        while t < end:  # one segment per column block the run touches
            cb = t // KT
            k0 = t - cb * KT
            k1 = tl.minimum(KT, end - cb * KT)
            offs_n, n_mask, feat = _columns(cb, lane, N, FFN, BLOCK_N, GLU)
            # The epilogue's operands are loaded now, while the weights stream: only the program completing the
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
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            k_loop = k0
            if t == start:  # the tiles loaded first
                acc = _w_dot(qw0, s0, zlo0, zhi0, x32, k0, rows, ROWS, ASM, True)
                k_loop = k0 + 1
                if first_len > 1:
                    acc += _w_dot(qw1, s1, zlo1, zhi1, x32, k0 + 1, rows, ROWS, ASM, True)
                    k_loop = k0 + 2
                if PDL:  # only now the next kernel may launch (5% more tok/s than at the start: run 13)
                    gdc_launch_dependents()
            for it in tl.range(k_loop, k1, num_stages=STAGES):
                qw, s, zlo, zhi = _w_tile(qw_ptr, qz_ptr, s_ptr, it, rows, offs_n, n_mask, N, ROWS, SUB)
                acc += _w_dot(qw, s, zlo, zhi, x32, it, rows, ROWS, ASM, True)
            if HAS_BIAS:
                if k0 == 0:
                    acc += bias
            # Split-K reduction (as sync._store_output, with relaxed partial sums): into a float32 workspace kept
            # at zero between calls; the counter adds up K tiles, and the program completing them finishes it.
            if ASM:
                tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
            else:
                tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + cb, k1 - k0)  # acq_rel, gpu scope
            if arrived + (k1 - k0) == KT:  # this segment completes the column block
                # The sums are read with relaxed atomics (the counter's acquire orders them after every partial
                # sum; relaxed, they need not wait on each other): the linear's output, gate, RoPE partner.
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                y = _read_sum(ws_ptr + offs_n, n_mask, ASM).to(DT).to(tl.float32)
                out_n = offs_n
                keep = n_mask
                if GLU:  # w1(x) * silu(w2(x)): the up lanes take their gate from the other half of the block
                    gate = _read_sum(ws_ptr + offs_n + FFN, n_mask & (lane < BLOCK_N // 2), ASM)
                    gate = gate.to(DT).to(tl.float32)
                    act = (gate / (1.0 + tl.exp(-gate))).to(DT).to(tl.float32)
                    y = y * act
                    out_n = feat
                    keep = n_mask & (lane < BLOCK_N // 2)
                if ROPE_N > 0:  # rotate-half RoPE over whole heads: the partner column is in this block
                    first = d < HEAD // 2
                    partner = tl.where(first, offs_n + HEAD // 2, offs_n - HEAD // 2)
                    pt = _read_sum(ws_ptr + partner, n_mask, ASM).to(DT).to(tl.float32)
                    rot = tl.where(first, -pt, pt)
                    roped = (y * cos + rot * sin).to(DT).to(tl.float32)
                    if LOGN:
                        roped = tl.where(offs_n < Q_N, (roped * qs).to(DT).to(tl.float32), roped)
                    y = tl.where(offs_n < ROPE_N, roped, y)
                if RES:
                    y = y + res
                tl.store(out_ptr + out_n, y.to(DT), mask=keep)
                tl.debug_barrier()  # every partner read is done before the workspace is re-armed
                tl.store(ws_ptr + offs_n, zero, mask=n_mask)
                tl.store(cnt_ptr + cb, 0)
            t = cb * KT + k1


def fusable(layer) -> bool:
    """Whether a GPTQLinear can run through `fused_int4_gemv`: Int4 on the Triton backend, groups in order,
    official layout, whole power-of-two groups of at most 256, output a multiple of 128, a split-K workspace."""
    return (layer.backend == "triton" and layer.perm is None and layer._workspace is not None
            and fusable_shape(layer.bits, layer.group_size, layer.in_features, layer.out_features))


def fusable_shape(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    """`fusable`'s conditions on the layer's numbers alone (what each Qwen size's layers are checked against)."""
    g = group_size
    return (bits == 4 and g & (g - 1) == 0 and g <= 256 and in_features % g == 0
            and out_features % 128 == 0 and in_features % 128 == 0)


# Launch settings of the fused kernel: (BLOCK_N, BLOCK_K, programs per SM, num_warps, num_stages), the fastest at
# every Qwen-7B shape on an H100 (docs/performance-notes.md, quantization run 12), and again through the engine with the
# later launch signal (run 13).
FUSED_CONFIG = (512, 64, 2, 4, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter), so that a config's programs per
    SM is its number of programs there."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_int4_gemv(x, layer, *, norm_weight=None, eps: float = 0.0, glu: int = 0,
                    residual=None, rope=None, config: tuple | None = None) -> torch.Tensor:
    """[K] -> [1, N] in x's dtype through an Int4 GPTQLinear (`fusable`):
      x: a tensor, or a batch-1 attention's `SplitPartials` (K = heads x head_dim; the result then takes the
      residual's dtype): each program combines the splits of its own inputs, as the attention would have;
      norm_weight: the input is RMSNorm(x) * norm_weight (eps), else x itself;
      glu=F: the layer's outputs are [up | gate] of F each and the result is up * silu(gate), [1, F];
      residual: + residual [N];  rope=(cos [HEAD], sin [HEAD], q_scale or None, rope_n, q_n, head): RoPE on the
      columns < rope_n in heads of `head`, and the LogN scale on the columns < q_n."""
    K, N = layer.in_features, layer.out_features
    block_n, block_k, per_sm, warps, stages = config or FUSED_CONFIG
    while glu and glu % (block_n // 2) and warps > 1:  # gate_up's blocks: whole halves of up and gate
        block_n, warps = block_n // 2, warps // 2
    g = layer.group_size
    block_k = 1 << (max(8, min(block_k, g)).bit_length() - 1)
    assert block_n == 128 * warps and fusable(layer), "fused_int4_gemv: see fusable() and BLOCK_N = 128 x warps"
    assert not glu or (N == 2 * glu and glu % (block_n // 2) == 0), "glu: N = 2F, F a multiple of 64"
    parts = x if isinstance(x, SplitPartials) else None
    splits = parts.splits if parts is not None else 1
    x = parts.acc if parts is not None else x.reshape(-1)
    assert x.is_contiguous() and x.numel() == K * splits
    if parts is not None:
        assert residual is not None and norm_weight is None and not glu, "SplitPartials: for a projection + residual"
        heads = parts.ml.shape[1] // splits
        assert heads * splits == parts.ml.shape[1] and K % heads == 0 and K // heads % block_k == 0, \
            "SplitPartials: batch 1, whole K tiles per head"
    out = torch.empty((1, glu or N), device=x.device, dtype=residual.dtype if parts is not None else x.dtype)
    # prologue, into an fp16 scratch row: 1 RMSNorm; 2 the inputs (converted from other dtypes); 3 the attention's
    # split partials combined
    pro = 3 if parts is not None else 1 if norm_weight is not None else 2
    scratch = torch.empty(K, device=x.device, dtype=torch.float16)
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
    nblk = triton.cdiv(glu, block_n // 2) if glu else triton.cdiv(N, block_n)
    kt = K // block_k
    programs = min(nblk * kt, per_sm * _sm_count(x.device))
    # A whole number of programs per column block, so that every program's run of K tiles lies in one column block:
    # a run spanning two restarts its pipeline and adds a second reduction, and made those programs (38 of gate_up's
    # 264) the last to finish by ~2 us (docs/performance-notes.md run 18).
    if programs >= nblk:
        programs -= programs % nblk
    run_max = triton.cdiv(kt, programs // nblk) if programs % nblk == 0 else kt  # K tiles a program's run reads
    if parts is not None:
        head, norm_weight = K // heads, parts.ml
    _fused_int4_kernel[(programs,)](
        x, norm_weight if norm_weight is not None else any_ptr, scratch, layer.qweight, layer.qzeros,
        layer.scales, bias if bias is not None else any_ptr, out, ws, cnt,
        residual if residual is not None else any_ptr, cos if cos is not None else any_ptr,
        sin if sin is not None else any_ptr, q_scale if q_scale is not None else any_ptr, N, K, glu, eps, nblk,
        programs, GROUP=g, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        PRO=pro, K_POW2=triton.next_power_of_2(K), GLU=glu > 0, RES=residual is not None, ROPE_N=rope_n, Q_N=q_n,
        LOGN=q_scale is not None, HEAD=head, ASM=not INTERPRET, PDL=sync.pdl(x.device), SPLITS=splits,
        RUN_MAX=triton.next_power_of_2(run_max) if pro >= 2 else 1,
        num_warps=warps, num_stages=stages, **sync.pdl_launch(x.device))
    return out
