"""Memory-ordering helpers shared by the Triton kernels that finish a reduction in the last program to arrive."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Whether the last-arriving-program reductions (split-K GEMVs, split decode attention) fence in every thread before
# the arrival count. Off: the order comes from the CTA barrier plus the count's release by the one thread that
# performs it (a PTX release is cumulative over what the barrier ordered before it; CUTLASS's split-K semaphore
# works the same way). Measured on an H100 (docs/benchmarks.md): 0.3-0.6 us less per GEMV and per attention
# call, with results identical bit for bit over 100 repeats (`bench/bench_quant.py` kernel checks).
PER_THREAD_FENCE = False

if triton is not None:

    @triton.jit
    def _fence_gpu():
        """fence.acq_rel.gpu in every thread (a one-element op, so once per thread). No escape sequences in
        kernel source: torch.compile re-embeds it in a string literal, where they would be decoded."""
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [tl.zeros([1], dtype=tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
