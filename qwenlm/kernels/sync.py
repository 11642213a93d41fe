"""What the Triton kernels share about ordering: programmatic dependent launch, an L2 prefetch issued before the
wait for the kernel before, and the batch-1 GEMVs' split-K epilogue finished by the last program to arrive
(`_store_output`).

The last-arriving-program reductions (split-K GEMVs, split decode attention) order their partial sums before the
arrival count by a CTA barrier plus the count's release by the one thread that performs it: a PTX release is
cumulative over what the barrier ordered before it (CUTLASS's split-K semaphore works the same way). A gpu-scope
fence in every thread instead measured 0.3-0.6 us more per GEMV and per attention call on an H100, with results
identical bit for bit (docs/performance-notes.md)."""

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

# Programmatic dependent launch (CUDA sm_90+, wherever triton has it): the batch-1 Int4 GEMVs and the decode
# attention are launched so that each may start while the kernel before it ends. Such a kernel loads only weights
# (never written by a kernel) before `gdc_wait`, which returns once the kernel before has finished and its writes
# are visible, and then lets the next one launch (the attention at once, a fused GEMV once its first two weight
# tiles are summed, which measured 5% faster than at once: run 13); a kernel launched after one that never signals
# starts when that one ends, as without PDL. 1.5% more Int4 tok/s at batch 1 on an H100 (docs/performance-notes.md, run 12)
# and with the later signal 9% (run 13: 397.5 and 400.2 against 364.9).
@functools.lru_cache(maxsize=None)
def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` take PDL=True and launch with `pdl_launch`: sm_90+ with a triton that has it,
    never in the interpreter."""
    return (triton is not None and gdc_wait is not None and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_launch(device: torch.device) -> dict:
    """The launch option of a kernel taking PDL=pdl(device)."""
    return {"launch_pdl": True} if pdl(device) else {}


if triton is not None:

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
    def _pdl_start(PDL: tl.constexpr):
        """With PDL: wait for the kernel before (everything it and earlier ones wrote is visible after this) and let
        the next kernel launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _store_output(out, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_n, n_mask, pid_n, pid_k, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_N: tl.constexpr):
        """The epilogue of the batch-1 GEMVs (`gptq_gemv`, `gptq_int4`): out [BLOCK_N] float32 partial (or whole)
        dot products."""
        if HAS_BIAS:
            if pid_k == 0:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)
        elif FUSED_REDUCE:
            # Split-K without the zero-fill and cast kernels: partial sums go to a float32 workspace kept at
            # zero between calls; the last program of each column block (counted by an atomic) writes the
            # output and re-arms the workspace and its counter. Saves two launches per linear.
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
