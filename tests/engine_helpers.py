"""Shared tiny-model builders for the engine tests."""

import torch

from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine
from qwenlm.generation import generate_ids
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.testing import TINY, random_state_dict


def tiny_model(**overrides) -> QWenLMHeadModel:
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 1000, **overrides})
    model = QWenLMHeadModel(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=1))
    return model.eval()


def tiny_engine(model, tokenizer=None, **kw) -> LLMEngine:
    kw = {"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return LLMEngine(model, tokenizer, EngineConfig(**kw))


def random_prompts(lengths, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_ids(model, prompt, params, stop_ids=frozenset()):
    """The single-request reference loop (DenseKVCache, token by token)."""
    return generate_ids(model, [prompt], params, set(stop_ids))[0]
