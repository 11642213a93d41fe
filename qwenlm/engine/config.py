"""EngineConfig: the knobs of the serving engine (KV pool, batching, graphs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block; small blocks give finer prefix-cache sharing
    gpu_memory_utilization: float = 0.9  # share of the GPU's total memory the process may use
    num_blocks: int | None = None  # KV blocks in the pool; None = sized from free GPU memory (CPU: 512)
    max_num_seqs: int = 256  # running sequences at once
    max_num_batched_tokens: int = 8192  # prefill token budget per step (chunked prefill)
    max_model_len: int | None = None  # prompt + output tokens per sequence; None = config's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # torch.compile the decode and prefill forwards by regions (compiled_decode.py): fused pointwise kernels, Triton
    # GEMVs at batch 1. None = on with CUDA graphs on a GPU (adds up to ~60 s to the first engine start at 7B;
    # Inductor caches it on disk, and later starts take a few seconds).
    compile_decode: bool | None = None
    overlap_steps: bool = True  # launch step N+1 before processing step N's tokens on the host (engine.py)
    fuse_mlp: bool = True  # one gate_up linear for w1 and w2 (fusion.py); skipped for quantized layers
    cuda_graph_batch_sizes: list[int] | None = None  # None = 1,2,4,8,16,24,...,max_num_seqs
    attention_backend: str = "auto"  # "auto" (Triton on CUDA, else torch), "triton", "torch"
    kv_cache_dtype: str = "auto"  # "auto" = the model dtype; "int8" = uint8 + scale/zero per token and head (~1.9x tokens)
    seed: int = 0  # seeds of requests that give none are drawn from this

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"EngineConfig.block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("EngineConfig.max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"EngineConfig.attention_backend must be auto|triton|torch, got {self.attention_backend!r}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"EngineConfig.kv_cache_dtype must be auto|int8, got {self.kv_cache_dtype!r}")

    def use_compiled_decode(self, on_cuda: bool) -> bool:
        if self.compile_decode is None:
            return on_cuda and not self.enforce_eager
        return self.compile_decode

    def graph_batch_sizes(self) -> list[int]:
        if self.cuda_graph_batch_sizes is not None:
            return sorted(set(self.cuda_graph_batch_sizes))
        sizes = [1, 2, 4, 8] + list(range(16, self.max_num_seqs + 1, 16))
        return sorted({b for b in sizes if b <= self.max_num_seqs} | {self.max_num_seqs})
