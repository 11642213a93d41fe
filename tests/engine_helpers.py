"""Shared tiny-model builders for the engine tests."""

import pytest
import torch

from qwenlm.config import ModelConfig
from qwenlm.engine import EngineConfig, LLMEngine
from qwenlm.engine import engine as engine_module
from qwenlm.generation import generate_ids
from qwenlm.model.qwen import DenseKVCache, QWenLMHeadModel, ntk_alpha
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


@torch.no_grad()
def direct_log_softmax(model, ids: list[int], prompt_len: int | None = None) -> torch.Tensor:
    """log_softmax [len(ids), V] of one forward over `ids`, alpha from the prompt length (the official model
    chooses it at prefill and keeps it while decoding)."""
    cfg = model.config
    n = prompt_len or len(ids)
    alpha = ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    x = torch.tensor([ids])
    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(torch.ones_like(x, dtype=torch.bool))
    hidden = model(x, torch.arange(len(ids))[None], cache, model.inv_freq([alpha], "cpu"))
    return model.logits(hidden)[0].log_softmax(-1)


# Runs whose batches differ (chunking, preemption, overlap, batch size) sum in another order: their fp32
# logprobs (about -7 on these models) differ by a few ulps (measured 4.8e-7, one ulp, with 1 and 2 threads).
# 1e-4 is 200x that and below the smallest step-to-step change of one sequence's logprobs (1.4e-3 measured), so a
# logprob of another position, another row or processed (not raw) logits still fails.
LOGPROB_ATOL = 1e-4


def assert_same_completions(got, want):
    """Two engines' CompletionOutputs: token ids and finish reasons exactly, logprobs within LOGPROB_ATOL."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None:
            assert a.logprobs == pytest.approx(b.logprobs, rel=0, abs=LOGPROB_ATOL)


EXPLODE_SEED = 666  # requests with this seed get text handling that breaks (greedy ones ignore the seed)


def break_text_handling(monkeypatch, after: int = 3) -> None:
    """The text handling (detokenizer + stop strings) of requests seeded EXPLODE_SEED raises at token after+1."""
    push, init = engine_module._TextState.push, engine_module._TextState.__init__

    def exploding(self, token_id):
        self.calls = getattr(self, "calls", 0) + 1
        if self.params.seed == EXPLODE_SEED and self.calls > after:
            raise UnicodeError("detokenizer broke")
        return push(self, token_id)

    def remember(self, tokenizer, params):
        init(self, tokenizer, params)
        self.params = params

    monkeypatch.setattr(engine_module._TextState, "push", exploding)
    monkeypatch.setattr(engine_module._TextState, "__init__", remember)


class ScriptedHead:
    """Replaces model.logits so the tiny model writes a chosen reply: each time the engine asks for logits, the
    next token of the script gets all the probability, then <|im_end|>."""

    def __init__(self, tokenizer, vocab_size):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self.tokens, self.i = [], 0

    def say(self, text: str) -> None:
        self.tokens, self.i = self.tok.encode(text) + [self.tok.im_end_id], 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], self.vocab_size), -100.0, device=hidden.device)
        for row in range(hidden.shape[0]):
            logits[row, self.tokens[min(self.i, len(self.tokens) - 1)]] = 100.0
            self.i += 1
        return logits


class PromptScriptedHead:
    """Replaces model.logits so that each request writes the reply `reply(prompt_text)` chooses for its own
    prompt, token by token, then <|im_end|> — also when the engine batches requests. The runner's `launch` is
    wrapped to see which sequences a step's logits rows belong to (rows follow the batch's sample_seqs)."""

    def __init__(self, tokenizer, model, runner, reply=None):
        self.tok, self.vocab_size = tokenizer, model.config.vocab_size
        self.use(reply)
        self.seqs = []
        launch = runner.launch

        def tracking_launch(batch, prev=None):
            self.seqs = batch.sample_seqs
            return launch(batch, prev)

        runner.launch = tracking_launch
        model.logits = self

    def use(self, reply) -> None:
        """Write the replies of `reply` from now on (forgetting the prompts seen)."""
        self.reply = reply
        self.scripts: dict[tuple, list[int]] = {}
        self.prompts: list[str] = []  # each distinct prompt, in the order first seen

    def _script(self, seq) -> list[int]:
        key = tuple(seq.token_ids[:seq.num_prompt_tokens])
        if key not in self.scripts:
            text = self.tok.decode(list(key))
            self.prompts.append(text)
            self.scripts[key] = self.tok.encode(self.reply(text)) + [self.tok.im_end_id]
        return self.scripts[key]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], self.vocab_size), -100.0, device=hidden.device)
        for row, seq in enumerate(self.seqs):
            script = self._script(seq)
            logits[row, script[min(len(seq) - seq.num_prompt_tokens, len(script) - 1)]] = 100.0
        return logits
