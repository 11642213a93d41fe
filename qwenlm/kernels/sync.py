"""Memory-ordering helpers shared by the Triton kernels that finish a reduction in the last program to arrive."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Whether the last-arriving-program reductions (split-K GEMVs, split decode attention) fence in every thread before
# the arrival count. Without it the order comes from the CTA barrier plus the count's release by one thread (PTX
# release is cumulative over what the barrier ordered before it, CUTLASS's semaphore pattern).
PER_THREAD_FENCE = True

if triton is not None:

    @triton.jit
    def _fence_gpu():
        """fence.acq_rel.gpu in every thread (a one-element op, so once per thread). No escape sequences in
        kernel source: torch.compile re-embeds it in a string literal, where they would be decoded."""
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [tl.zeros([1], dtype=tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
