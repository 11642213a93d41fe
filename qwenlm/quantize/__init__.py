"""GPTQ quantization of a Qwen checkpoint into the official Int4/Int8 folder layout."""

from qwenlm.quantize.run import main, quantize_model, run_quantize

__all__ = ["main", "quantize_model", "run_quantize"]
