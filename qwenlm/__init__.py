"""qwenlm: run, serve and quantize the Qwen (v1) chat models from their official checkpoint folders."""

__version__ = "0.1.0"
