"""Memory-ordering helpers shared by the Triton kernels that finish a reduction in the last program to arrive (and
the batch-1 GEMVs' split-K epilogue built on them, `_store_output`), and programmatic dependent launch."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

try:  # triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton or none: PDL off
    gdc_launch_dependents = gdc_wait = None

# Whether the last-arriving-program reductions (split-K GEMVs, split decode attention) fence in every thread before
# the arrival count. Off: the order comes from the CTA barrier plus the count's release by the one thread that
# performs it (a PTX release is cumulative over what the barrier ordered before it; CUTLASS's split-K semaphore
# works the same way). Measured on an H100 (docs/benchmarks.md): 0.3-0.6 us less per GEMV and per attention
# call, with results identical bit for bit over 100 repeats (`bench/bench_quant.py` kernel checks).
PER_THREAD_FENCE = False

# Programmatic dependent launch (CUDA sm_90+; QWENLM_PDL=0 turns it off): the batch-1 Int4 GEMVs and the decode
# attention are launched so that each may start while the kernel before it ends. Such a kernel loads only weights
# (never written by a kernel) before `gdc_wait`, which returns once the kernel before has finished and its writes
# are visible, and then lets the next one launch (the attention at once, a fused GEMV once its first two weight
# tiles are summed, which measured 5% faster than at once: run 13); a kernel launched after one that never signals
# starts when that one ends, as without PDL. 1.5% more Int4 tok/s at batch 1 on an H100 (docs/benchmarks.md, run 12)
# and with the later signal 9% (run 13: 397.5 and 400.2 against 364.9).
PDL_ENABLED = os.environ.get("QWENLM_PDL", "1") != "0"

# Per-program timing of the batch-1 step's Triton kernels (`bench/bench_trace.py`): None, or an int64 tensor
# [launches, programs, 8] that each launch, in order from `trace_reset()`, fills per program with its SM, then
# global-timer readings (ns): start, after the wait for the kernel before, end, and kernel-specific points (4-7).
# Kernels are compiled with TRACE only while it is set.
TRACE: torch.Tensor | None = None
_trace_next = [0]


def trace_reset() -> None:
    _trace_next[0] = 0


def trace_launch(any_tensor: torch.Tensor) -> dict:
    """A launch's trace arguments (TR, TR_OFF, TRACE): the next slot of TRACE, or none."""
    slot = _trace_next[0]
    if TRACE is None or slot >= TRACE.shape[0]:
        return dict(TR=any_tensor, TR_OFF=0, TRACE=False)
    _trace_next[0] += 1
    return dict(TR=TRACE, TR_OFF=slot * TRACE.shape[1] * 8, TRACE=True)


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return (triton is not None and gdc_wait is not None and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` take PDL=True and launch with `pdl_launch`."""
    return PDL_ENABLED and _pdl_capable(device)


def pdl_launch(device: torch.device) -> dict:
    """The launch option of a kernel taking PDL=pdl(device)."""
    return {"launch_pdl": True} if pdl(device) else {}


if triton is not None:

    @triton.jit
    def _fence_gpu():
        """fence.acq_rel.gpu in every thread (a one-element op, so once per thread). No escape sequences in
        kernel source: torch.compile re-embeds it in a string literal, where they would be decoded."""
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [tl.zeros([1], dtype=tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_l2(base, nbytes, THREADS: tl.constexpr):
        """Bytes [base, base + nbytes) (base an int8 pointer, 16-byte aligned; nbytes a multiple of 16 * THREADS)
        into L2 without waiting: one bulk prefetch (cp.async.bulk.prefetch.L2, sm_90) of nbytes / THREADS per
        thread."""
        part = nbytes // THREADS
        ptrs = base + tl.arange(0, THREADS) * part
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0;", "=r,l,r",
                                  [ptrs, part + tl.zeros([THREADS], dtype=tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _trace(TR, TR_OFF, pid, WHAT: tl.constexpr, TRACE: tl.constexpr):
        """With TRACE: entry WHAT of program pid's row (`TRACE`): 0 the SM it runs on, else the global timer (ns)."""
        if TRACE:
            _trace_after(TR, TR_OFF, pid, WHAT, TRACE, tl.zeros([1], dtype=tl.int32))

    @triton.jit
    def _trace_after(TR, TR_OFF, pid, WHAT: tl.constexpr, TRACE: tl.constexpr, dep):
        """`_trace`, read once dep (a [1] int32 computed from the data of interest) is ready: the reading adds dep's
        top bit (0 or 1 ns), which ties it to dep."""
        if TRACE:
            one = tl.zeros([1], dtype=tl.int32)
            if WHAT == 0:
                v = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [one], dtype=tl.int32, is_pure=False,
                                              pack=1).to(tl.int64)
            else:
                v = tl.inline_asm_elementwise(
                    "{ .reg .u32 t; .reg .u64 tt; shr.u32 t, $1, 31; cvt.u64.u32 tt, t; mov.u64 $0, %globaltimer; "
                    "add.u64 $0, $0, tt; }", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)
            tl.store(TR + TR_OFF + pid.to(tl.int64) * 8 + WHAT + one, v)

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """With PDL: wait for the kernel before (everything it and earlier ones wrote is visible after this) and let
        the next kernel launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _store_output(out, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
                      RELAXED: tl.constexpr):
        """The epilogue of the batch-1 GEMVs (`gptq_gemv`, `gptq_int4`): out [BLOCK_N] float32 partial (or whole)
        dot products.
        RELAXED: the partial sums are fire-and-forget reductions (no acquire, no L1 invalidation each), then
        one gpu-scope fence per thread orders them before the arrival count."""
        if HAS_BIAS:
            if pid_k == 0:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)
        elif FUSED_REDUCE:
            # Split-K without the zero-fill and cast kernels: partial sums go to a float32 workspace kept at
            # zero between calls; the last program of each column block (counted by an atomic) writes the
            # output and re-arms the workspace and its counter. Saves two launches per linear.
            if RELAXED:
                tl.atomic_add(ws_ptr + offs_n, out, mask=n_mask, sem="relaxed")
                _fence_gpu()
            else:
                tl.atomic_add(ws_ptr + offs_n, out, mask=n_mask)
            tl.debug_barrier()  # every thread's partial sums are issued before the count is released
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel, gpu scope
            if arrived == SPLIT_K - 1:
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                total = tl.atomic_add(ws_ptr + offs_n, zero, mask=n_mask)  # read where the atomics landed (L2)
                tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.store(ws_ptr + offs_n, zero, mask=n_mask)  # every partial has arrived: plain stores re-arm
                tl.store(cnt_ptr + pid_n, 0)
        else:
            tl.atomic_add(out_ptr + offs_n, out, mask=n_mask)
