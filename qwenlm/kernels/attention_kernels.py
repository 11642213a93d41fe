"""The paged decode attention kernels (v1, v2, mma) that `qwenlm.kernels.attention.paged_decode_attention` launches;
see that module for what each does and how they are chosen."""

from __future__ import annotations

import triton
import triton.language as tl

from qwenlm.kernels.attention_splits import _finish, _span, _store_partial
from qwenlm.kernels.kv_int8 import _quantize_rows
from qwenlm.kernels.sync import _pdl_start, _prefetch_l2


@triton.jit
def _paged_decode_kernel(Q, K, V, KSZ, VSZ, Kin, Vin, Slots, Out, BlockTables, ContextLens, scale,
                         stride_qb, stride_qh, stride_kb, stride_kp, stride_kh,
                         stride_sb, stride_sp, stride_sh,
                         stride_knb, stride_knh, stride_vnb, stride_vnh,
                         stride_ob, stride_oh, stride_bt,
                         PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         KV_INT8: tl.constexpr, FUSED_STORE: tl.constexpr):
    """Program (sequence b, head h): the whole context in BLOCK_N-token tiles. FUSED_STORE: as in v2."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx_len, start, end, n_used = _span(ContextLens, b, 0, 1, BLOCK_N, FUSED_STORE, False, 0)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
    q_sum = tl.sum(q, 0)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        n = s0 + tl.arange(0, BLOCK_N)
        valid = n < end
        blk = tl.load(BlockTables + b * stride_bt + n // PAGE, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + (n % PAGE) * stride_kp + h * stride_kh  # [BLOCK_N]
        sz = blk * stride_sb + (n % PAGE) * stride_sp + h * stride_sh  # (scale, zero) rows (int8 pools)
        k = tl.load(K + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if KV_INT8:
            k_scale = tl.load(KSZ + sz, mask=valid, other=0.0)
            k_zero = tl.load(KSZ + sz + 1, mask=valid, other=0.0)
            s = k_scale * (tl.sum(k * q[None, :], 1) - k_zero * q_sum)  # q . scale*(k - zero)
        else:
            s = tl.sum(k * q[None, :], 1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        v = tl.load(V + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if KV_INT8:
            pv = p * tl.load(VSZ + sz, mask=valid, other=0.0)  # p * scale
            v_zero = tl.load(VSZ + sz + 1, mask=valid, other=0.0)
            acc = acc * alpha + tl.sum(pv[:, None] * v, 0) - tl.sum(pv * v_zero, 0)
        else:
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    hh = h + tl.arange(0, 1)
    m1, l1, acc1 = m + tl.zeros([1], tl.float32), l_sum + tl.zeros([1], tl.float32), acc[None, :]
    if FUSED_STORE:
        m1, l1, acc1 = _store_new_and_attend(K, V, KSZ, VSZ, Kin, Vin, Slots, b, hh, 0, d, q[None, :], m1, l1,
                                             acc1, ctx_len, stride_kb, stride_kp, stride_kh, stride_sb,
                                             stride_sp, stride_sh, stride_knb, stride_knh, stride_vnb,
                                             stride_vnh, PAGE, KV_INT8)
    _finish(Out, Out, Out, Out, Out, b, hh, 0, d, m1, l1, acc1, 0, 1, n_used, stride_ob, stride_oh, HEAD_DIM,
            False, False, 1)


@triton.jit
def _store_new_and_attend(K, V, KSZ, VSZ, Kin, Vin, Slots, b, hh, sp, d, q, m, l_sum, acc, ctx_len,
                          stride_kb, stride_kp, stride_kh, stride_sb, stride_sp, stride_sh,
                          stride_knb, stride_knh, stride_vnb, stride_vnh, PAGE: tl.constexpr,
                          KV_INT8: tl.constexpr):
    """The fused store: the new token's K/V rows of heads hh (from Kin / Vin) go into slot Slots[b], quantized
    for int8, by split 0 only; then one online-softmax step over that row as stored. q: the scaled query
    [HB, D] fp32; (m, l_sum, acc) [HB], [HB], [HB, D]: the running softmax state, returned updated."""
    slot = tl.load(Slots + b).to(tl.int64)
    dst = (slot // PAGE) * stride_kb + (slot % PAGE) * stride_kp + hh[:, None] * stride_kh + d[None, :]
    kn = tl.load(Kin + b * stride_knb + hh[:, None] * stride_knh + d[None, :])
    vn = tl.load(Vin + b * stride_vnb + hh[:, None] * stride_vnh + d[None, :])
    first_h = (hh * 0 + sp) == 0  # split 0 stores (masks as tensors: the interpreter wants them)
    first = first_h[:, None] & (d[None, :] >= 0)
    if KV_INT8:
        dst_sz = (slot // PAGE) * stride_sb + (slot % PAGE) * stride_sp + hh * stride_sh
        kq, k_scale, k_zero = _quantize_rows(kn.to(tl.float32))
        vq, v_scale, v_zero = _quantize_rows(vn.to(tl.float32))
        tl.store(K + dst, kq, mask=first)
        tl.store(KSZ + dst_sz, k_scale, mask=first_h)
        tl.store(KSZ + dst_sz + 1, k_zero, mask=first_h)
        tl.store(V + dst, vq, mask=first)
        tl.store(VSZ + dst_sz, v_scale, mask=first_h)
        tl.store(VSZ + dst_sz + 1, v_zero, mask=first_h)
        k_new = k_scale[:, None] * (kq.to(tl.float32) - k_zero[:, None])  # the row as stored
        v_new = v_scale[:, None] * (vq.to(tl.float32) - v_zero[:, None])
    else:
        kn = kn.to(K.dtype.element_ty)
        vn = vn.to(V.dtype.element_ty)
        tl.store(K + dst, kn, mask=first)
        tl.store(V + dst, vn, mask=first)
        k_new = kn.to(tl.float32)
        v_new = vn.to(tl.float32)
    # online-softmax step for the one new row, in split 0 only (branch-free: -inf elsewhere)
    s_new = tl.where(first_h & (ctx_len > 0), tl.sum(k_new * q, 1), float("-inf"))  # [HB]
    m_new = tl.maximum(m, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p_new = tl.exp(s_new - m_safe)
    return m_new, l_sum * alpha + p_new, acc * alpha[:, None] + p_new[:, None] * v_new


@triton.jit
def _paged_decode_v2_kernel(Q, K, V, KSZ, VSZ, Kin, Vin, Slots, Out, PartM, PartL, PartAcc, Counters,
                            BlockTables, ContextLens, scale,
                            stride_qb, stride_qh, stride_kb, stride_kp, stride_kh,
                            stride_sb, stride_sp, stride_sh,
                            stride_knb, stride_knh, stride_vnb, stride_vnh,
                            stride_ob, stride_oh, stride_bt,
                            PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                            KV_INT8: tl.constexpr, FUSED_STORE: tl.constexpr,
                            SPLIT: tl.constexpr, FUSED_REDUCE: tl.constexpr, MIN_CHUNK: tl.constexpr,
                            BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Program (sequence b, head h, split sp), the head kept as an axis of one (hh [1]) so that the tiles are
    [BLOCK_N, 1, HEAD_DIM] as in the helpers it shares with the other kernels.
    SPLIT: the context is cut into num_programs(2) ranges whose partial (max, sum, acc) the last split to
    finish (FUSED_REDUCE) or a second kernel combines (flash-decoding). FUSED_STORE: the new token (position
    ctx_len - 1) comes from Kin / Vin, not from the pool; split 0 writes it into slot Slots[b] (quantized for
    int8) and attends to it as stored, so the store launches disappear and no program reads the slot being
    written. PDL: waits for the kernel before first (`sync._pdl_start`)."""
    _pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    n_splits = tl.num_programs(2)
    ctx_len, start, end, n_used = _span(ContextLens, b, sp, n_splits, BLOCK_N, FUSED_STORE, SPLIT, MIN_CHUNK)
    hh = h + tl.arange(0, 1)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + hh[:, None] * stride_qh + d[None, :]).to(tl.float32) * scale  # [1,D]
    q_sum = tl.sum(q, 1)
    m = tl.full([1], float("-inf"), tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, HEAD_DIM], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        n = s0 + tl.arange(0, BLOCK_N)
        valid = n < end
        blk = tl.load(BlockTables + b * stride_bt + n // PAGE, mask=valid, other=0).to(tl.int64)
        row = blk * stride_kb + (n % PAGE) * stride_kp
        off = row[:, None, None] + hh[None, :, None] * stride_kh + d[None, None, :]  # [BN,HB,D]
        k = tl.load(K + off, mask=valid[:, None, None], other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=valid[:, None, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :, :], 2)  # [BN,HB]
        if KV_INT8:
            sz = (blk * stride_sb + (n % PAGE) * stride_sp)[:, None] + hh[None, :] * stride_sh  # [BN,HB]
            k_scale = tl.load(KSZ + sz, mask=valid[:, None], other=0.0)
            k_zero = tl.load(KSZ + sz + 1, mask=valid[:, None], other=0.0)
            s = k_scale * (s - k_zero * q_sum[None, :])  # q . scale*(k - zero)
        s = tl.where(valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[None, :])
        l_sum = l_sum * alpha + tl.sum(p, 0)
        if KV_INT8:
            pv = p * tl.load(VSZ + sz, mask=valid[:, None], other=0.0)  # p * scale
            v_zero = tl.load(VSZ + sz + 1, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.sum(pv[:, :, None] * v, 0) - tl.sum(pv * v_zero, 0)[:, None]
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 0)
        m = m_new
    if FUSED_STORE:
        m, l_sum, acc = _store_new_and_attend(K, V, KSZ, VSZ, Kin, Vin, Slots, b, hh, sp, d, q, m, l_sum, acc,
                                              ctx_len, stride_kb, stride_kp, stride_kh, stride_sb, stride_sp,
                                              stride_sh, stride_knb, stride_knh, stride_vnb, stride_vnh,
                                              PAGE, KV_INT8)
    _finish(Out, PartM, PartL, PartAcc, Counters, b, hh, sp, d, m, l_sum, acc, tl.num_programs(1),
            n_splits, n_used, stride_ob, stride_oh, HEAD_DIM, SPLIT, FUSED_REDUCE, BLOCK_S)


@triton.jit
def _mma_tile_load(K, V, KSZ, VSZ, BlockTables, b, h, s0, end, d, stride_kb, stride_kp, stride_kh, stride_sb,
                   stride_sp, stride_sh, stride_bt, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   KV_INT8: tl.constexpr):
    """Head h's K and V rows of positions s0 .. s0 + BLOCK_N (those < end valid) as stored [BN, D], and for int8
    pools their (scale, zero) pairs [BN] (zeros otherwise): (valid, k, v, k_scale, k_zero, v_scale, v_zero)."""
    n = s0 + tl.arange(0, BLOCK_N)
    valid = n < end
    blk = tl.load(BlockTables + b * stride_bt + n // PAGE, mask=valid, other=0).to(tl.int64)
    off = (blk * stride_kb + (n % PAGE) * stride_kp + h * stride_kh)[:, None] + d[None, :]  # [BN,D]
    k = tl.load(K + off, mask=valid[:, None], other=0)
    v = tl.load(V + off, mask=valid[:, None], other=0)
    k_scale = tl.zeros([BLOCK_N], tl.float32)
    k_zero = k_scale
    v_scale = k_scale
    v_zero = k_scale
    if KV_INT8:
        sz = blk * stride_sb + (n % PAGE) * stride_sp + h * stride_sh
        k_scale = tl.load(KSZ + sz, mask=valid, other=0.0)
        k_zero = tl.load(KSZ + sz + 1, mask=valid, other=0.0)
        v_scale = tl.load(VSZ + sz, mask=valid, other=0.0)
        v_zero = tl.load(VSZ + sz + 1, mask=valid, other=0.0)
    return valid, k, v, k_scale, k_zero, v_scale, v_zero


@triton.jit
def _mma_tile_step(valid, k, v, k_scale, k_zero, v_scale, v_zero, q_mat, q_mat_lo, q_sum, scale, m, l_sum, acc,
                   c, OP: tl.constexpr, Q_LO: tl.constexpr, KV_INT8: tl.constexpr):
    """One online-softmax step of the mma kernel over a tile from `_mma_tile_load`: (m, l_sum, acc) updated."""
    k = k.to(OP)
    sc = tl.dot(k, q_mat)  # [BN,16] fp32, column 0 = k . q
    if Q_LO:
        sc += tl.dot(k, q_mat_lo)
    s = tl.sum(sc, 1)
    if KV_INT8:
        s = k_scale * (s - k_zero * q_sum)  # q . scale*(k - zero)
    s = tl.where(valid, s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    l_sum = l_sum * alpha + tl.sum(p, 0)
    v = v.to(OP)
    pv = p
    if KV_INT8:
        pv = p * v_scale
    pv_hi = pv.to(OP)
    p_hi = tl.where(c[:, None] == 0, pv_hi[None, :], 0.0).to(OP)  # [16,BN]
    p_lo = tl.where(c[:, None] == 0, (pv - pv_hi.to(tl.float32)).to(OP)[None, :], 0.0).to(OP)
    acc = acc * alpha + tl.dot(p_hi, v) + tl.dot(p_lo, v)
    if KV_INT8:
        acc -= tl.where(c[:, None] == 0, tl.sum(pv * v_zero, 0), 0.0)  # sum p * scale * zero
    return m_new, l_sum, acc


@triton.jit
def _paged_decode_mma_kernel(Q, K, V, KSZ, VSZ, Kin, Vin, Slots, Out, PartM, PartL, PartAcc, Counters,
                             BlockTables, ContextLens, scale,
                             stride_qb, stride_qh, stride_kb, stride_kp, stride_kh,
                             stride_sb, stride_sp, stride_sh,
                             stride_knb, stride_knh, stride_vnb, stride_vnh,
                             stride_ob, stride_oh, stride_bt, PF, pf_bytes,
                             PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                             KV_INT8: tl.constexpr, FUSED_STORE: tl.constexpr, SPLIT: tl.constexpr,
                             OP: tl.constexpr, Q_LO: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                             MIN_CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
                             PDL: tl.constexpr, PREFETCH: tl.constexpr, PF_THREADS: tl.constexpr,
                             PARTS: tl.constexpr):
    """v2's program (sequence b, head h, split sp) with both products on tensor cores: q.K^T as K[BN,D] @
    Q[D,16] and p.V as P[16,BN] @ V[BN,D], where only column / row 0 of the padded operand is nonzero.
    Decode attention stays bound by reading K/V; the point is what the tensor-core path does to that read:
    Triton stages tl.dot operands through shared memory with asynchronous copies (num_stages deep), so
    many more bytes are in flight per SM than with v1/v2's register tiles, and the per-element products
    and reductions leave the CUDA cores. Operands (OP) are in the pool dtype; for int8 pools in the query's
    dtype if bf16 or fp16 (both hold every uint8 exactly), else fp16. A query not exact in OP (Q_LO) and
    the weights p are split into a high and a low part (two products), so the result keeps ~16 bits where
    one bf16 operand would keep 8. PDL: as v2. PREFETCH: before waiting for the kernel before, each program
    sends its share of pf_bytes from PF (another kernel's weights) into L2. The first tile of K/V rows is loaded
    before that wait too, so that at short contexts only the query is read after it. PARTS: every split writes its
    partial state (`SplitPartials`) and none combines them."""
    if PREFETCH:
        idx = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        _prefetch_l2(PF + idx.to(tl.int64) * pf_bytes, pf_bytes, PF_THREADS)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    n_splits = tl.num_programs(2)
    # Context lengths and block tables are the step's inputs, and the cached rows were written by earlier steps:
    # none of them by the kernel before, so they may be read before waiting for it (with PDL, every kernel
    # before that one has finished once this one starts: each signals the next only after its own wait).
    ctx_len, start, end, n_used = _span(ContextLens, b, sp, n_splits, BLOCK_N, FUSED_STORE, SPLIT, MIN_CHUNK)
    hh = h + tl.arange(0, 1)
    d = tl.arange(0, HEAD_DIM)
    c = tl.arange(0, 16)
    # the first tile's rows load while the kernel before (c_attn) ends
    valid0, k0, v0, ksc0, kzr0, vsc0, vzr0 = _mma_tile_load(K, V, KSZ, VSZ, BlockTables, b, h, start, end, d,
                                                            stride_kb, stride_kp, stride_kh, stride_sb,
                                                            stride_sp, stride_sh, stride_bt, PAGE, BLOCK_N, KV_INT8)
    _pdl_start(PDL)
    qf = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32)  # [D], unscaled
    q_hi = qf.to(OP)
    q_mat = tl.where(c[None, :] == 0, q_hi[:, None], 0.0).to(OP)  # [D,16]
    q_mat_lo = q_mat
    if Q_LO:
        q_mat_lo = tl.where(c[None, :] == 0, (qf - q_hi.to(tl.float32)).to(OP)[:, None], 0.0).to(OP)
    q_sum = tl.sum(qf, 0)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([16, HEAD_DIM], tl.float32)  # row 0 is the output; the others stay 0
    if start < end:  # (an empty tile would turn the state into NaN)
        m, l_sum, acc = _mma_tile_step(valid0, k0, v0, ksc0, kzr0, vsc0, vzr0, q_mat, q_mat_lo, q_sum, scale,
                                       m, l_sum, acc, c, OP, Q_LO, KV_INT8)
    for s0 in range(start + BLOCK_N, end, BLOCK_N):
        valid, k, v, ksc, kzr, vsc, vzr = _mma_tile_load(K, V, KSZ, VSZ, BlockTables, b, h, s0, end, d,
                                                           stride_kb, stride_kp, stride_kh, stride_sb, stride_sp,
                                                           stride_sh, stride_bt, PAGE, BLOCK_N, KV_INT8)
        m, l_sum, acc = _mma_tile_step(valid, k, v, ksc, kzr, vsc, vzr, q_mat, q_mat_lo, q_sum, scale, m, l_sum,
                                       acc, c, OP, Q_LO, KV_INT8)
    acc_row = tl.sum(acc, 0)[None, :]  # [1,D]
    m1 = m + tl.zeros([1], tl.float32)
    l1 = l_sum + tl.zeros([1], tl.float32)
    if FUSED_STORE:
        m1, l1, acc_row = _store_new_and_attend(K, V, KSZ, VSZ, Kin, Vin, Slots, b, hh, sp, d,
                                                (qf * scale)[None, :], m1, l1, acc_row, ctx_len,
                                                stride_kb, stride_kp, stride_kh, stride_sb, stride_sp,
                                                stride_sh, stride_knb, stride_knh, stride_vnb, stride_vnh,
                                                PAGE, KV_INT8)
    if PARTS:  # every split's state, combined by the consumer (an unused split's: max -inf, sum 0, acc 0)
        _store_partial(PartM, PartL, PartAcc, b, hh, sp, d, m1, l1, acc_row, tl.num_programs(1), n_splits,
                       HEAD_DIM)
    else:
        _finish(Out, PartM, PartL, PartAcc, Counters, b, hh, sp, d, m1, l1, acc_row, tl.num_programs(1),
                n_splits, n_used, stride_ob, stride_oh, HEAD_DIM, SPLIT, FUSED_REDUCE, BLOCK_S)
