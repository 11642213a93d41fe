"""The serving engine: paged KV cache, continuous batching, CUDA-graph decode, batched sampler."""

from qwenlm.engine.async_engine import AsyncEngine
from qwenlm.engine.config import EngineConfig
from qwenlm.engine.engine import LLM, LLMEngine
from qwenlm.engine.outputs import CompletionOutput, RequestOutput
from qwenlm.sampling import SamplingParams

__all__ = ["AsyncEngine", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
