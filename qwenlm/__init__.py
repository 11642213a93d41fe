"""qwenlm: run, serve and quantize the Qwen (v1) chat models from their official checkpoint folders."""

from qwenlm.api import QwenLM, load
from qwenlm.config import GenerationConfig, ModelConfig
from qwenlm.sampling import SamplingParams
from qwenlm.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "QwenLM", "Tokenizer", "SamplingParams", "ModelConfig", "GenerationConfig"]
