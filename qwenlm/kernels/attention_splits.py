"""Context splits of the paged decode kernels (flash-decoding; `qwenlm.kernels.attention`): which range of the
context each split reads, how a split writes its partial softmax (max, sum, weighted values), and how the partials
are combined: by the last split to finish, counted in an int32 buffer the kernels keep at zero, or by a second
launch.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch path
    triton = None

if triton is not None:

    @triton.jit
    def _span(ContextLens, b, sp, n_splits, BLOCK_N: tl.constexpr, FUSED_STORE: tl.constexpr, SPLIT: tl.constexpr,
              MIN_CHUNK: tl.constexpr):
        """(context length, first and end position this program reads from the pool, splits in use): the cached
        context, less the new token when the kernel stores it itself; with SPLIT, split sp's BLOCK_N-aligned share
        of it. MIN_CHUNK > 0: only as many splits as give each at least MIN_CHUNK positions are used (at least
        one); the others read nothing and write nothing (`_finish`)."""
        ctx_len = tl.load(ContextLens + b)
        if FUSED_STORE:
            n_cached = tl.maximum(ctx_len - 1, 0)
        else:
            n_cached = ctx_len
        n_used = n_splits
        if MIN_CHUNK > 0:
            n_used = tl.maximum(tl.minimum(tl.cdiv(n_cached, MIN_CHUNK), n_splits), 1)
        if SPLIT:
            chunk = tl.cdiv(tl.cdiv(n_cached, n_used), BLOCK_N) * BLOCK_N
            start = sp * chunk
            end = tl.minimum(start + chunk, n_cached)
        else:
            start = 0
            end = n_cached
        return ctx_len, start, end, n_used

    @triton.jit
    def _combine_splits(PartM, PartL, PartAcc, Out, b, hh, d, n_heads, n_splits, n_used, stride_ob, stride_oh,
                        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        """Heads hh of sequence b from the partials of their first n_used splits (of n_splits): weights
        exp(m_i - max m), empty splits (m = -inf) weigh 0. Reads through L2 (.cg): other programs wrote them."""
        s = tl.arange(0, BLOCK_S)
        ok = (s < n_used)[None, :]
        part = (b * n_heads + hh)[:, None] * n_splits + s[None, :]  # [HB,S]
        m = tl.load(PartM + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_sum = tl.load(PartL + part, mask=ok, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, 1)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp(m - m_max[:, None])
        total = tl.sum(l_sum * w, 1)
        acc = tl.load(PartAcc + part[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0,
                      cache_modifier=".cg")  # [HB,S,D]
        o = tl.sum(acc * w[:, :, None], 1) / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(Out + b * stride_ob + hh[:, None] * stride_oh + d[None, :], o.to(Out.dtype.element_ty))

    @triton.jit
    def _write_out(Out, b, hh, d, l_sum, acc, stride_ob, stride_oh):
        """Heads hh of sequence b from one program's whole softmax state: acc / l_sum."""
        l_sum = tl.where(l_sum > 0, l_sum, 1.0)  # padding rows (ctx_len 0) give zeros, not NaN
        tl.store(Out + b * stride_ob + hh[:, None] * stride_oh + d[None, :],
                 (acc / l_sum[:, None]).to(Out.dtype.element_ty))

    @triton.jit
    def _store_partial(PartM, PartL, PartAcc, b, hh, sp, d, m, l_sum, acc, n_heads, n_splits, HEAD_DIM: tl.constexpr):
        """Split sp's partial softmax state of heads hh: (m, l_sum) at PartM / PartL [(b * n_heads + h) * n_splits +
        sp], acc at PartAcc [that * HEAD_DIM + d]."""
        part = (b * n_heads + hh) * n_splits + sp  # [HB]
        tl.store(PartM + part, m)
        tl.store(PartL + part, l_sum)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + d[None, :], acc)

    @triton.jit
    def _finish(Out, PartM, PartL, PartAcc, Counters, b, hh, sp, d, m, l_sum, acc, n_heads, n_splits, n_used,
                stride_ob, stride_oh, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                BLOCK_S: tl.constexpr):
        """Write heads hh of sequence b: acc / l_sum, or with SPLIT the partial (m, l_sum, acc) of split sp.
        FUSED_REDUCE: the last split of (b, program's heads) to finish, counted in Counters (kept at zero between
        calls), combines the partials itself: no second launch. n_used < n_splits (`_span`'s MIN_CHUNK, with
        FUSED_REDUCE only): splits from n_used on write nothing, and a single split used writes the output."""
        if SPLIT:
            if n_used == 1:
                if sp == 0:
                    _write_out(Out, b, hh, d, l_sum, acc, stride_ob, stride_oh)
            elif sp < n_used:
                _store_partial(PartM, PartL, PartAcc, b, hh, sp, d, m, l_sum, acc, n_heads, n_splits, HEAD_DIM)
                if FUSED_REDUCE:
                    tl.debug_barrier()  # every thread's partials are stored before the count (`sync`'s docstring)
                    grp = b * tl.num_programs(1) + tl.program_id(1)
                    arrived = tl.atomic_add(Counters + grp, 1)  # acq_rel, gpu scope
                    if arrived == n_used - 1:
                        _combine_splits(PartM, PartL, PartAcc, Out, b, hh, d, n_heads, n_splits, n_used, stride_ob,
                                        stride_oh, HEAD_DIM, BLOCK_S)
                        tl.store(Counters + grp, 0)
        else:
            _write_out(Out, b, hh, d, l_sum, acc, stride_ob, stride_oh)

    @triton.jit
    def _split_reduce_kernel(PartM, PartL, PartAcc, Out, stride_ob, stride_oh, N_SPLITS,
                             HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        """Combine the splits of one (sequence, head) (`_combine_splits`)."""
        h = tl.program_id(1)
        _combine_splits(PartM, PartL, PartAcc, Out, tl.program_id(0), h + tl.arange(0, 1), tl.arange(0, HEAD_DIM),
                        tl.num_programs(1), N_SPLITS, N_SPLITS, stride_ob, stride_oh, HEAD_DIM, BLOCK_S)
