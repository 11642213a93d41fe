"""The Python API: `qwenlm.load(...)` returns a `QwenLM` with generate, chat, chat_stream and tokenizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from qwenlm.chat import DEFAULT_SYSTEM, History, build_chat_prompt, chat_stop_ids, validate_history
from qwenlm.config import CHAT_FORMATS, GenerationConfig
from qwenlm.engine import EngineConfig, LLMEngine
from qwenlm.engine.outputs import RequestError
from qwenlm.hub import DEFAULT_MODEL
from qwenlm.loading import load_checkpoint
from qwenlm.model.qwen import QWenLMHeadModel
from qwenlm.sampling import ParamError, SamplingParams, check_int, wrap_seed
from qwenlm.tokenizer import Tokenizer


def load(name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = "auto",
         progress: bool = True, engine_config: EngineConfig | None = None, quantize: str | None = None,
         adapter: str | Path | None = None, tensor_parallel_size: int = 1) -> "QwenLM":
    """Load a Qwen v1 checkpoint folder (or hub name) for generation and chat.

    engine_config sizes the serving engine every call runs on (KV blocks, batch limits, CUDA graphs;
    kv_cache_dtype="int8" for an int8 KV cache). quantize="int8" turns a bf16/fp16 folder's block linears into
    per-channel int8 after loading (docs/quantization.md); GPTQ folders are refused. adapter: a PEFT LoRA
    adapter folder (from `qwenlm finetune` or the official finetune.py) merged into the weights after loading
    (docs/python-api.md, "Adapters and merging"). tensor_parallel_size N > 1 splits the model over N processes
    (N GPUs; gloo processes on the CPU), this one rank 0 (docs/parallel.md)."""
    ckpt = load_checkpoint(name_or_path, device, dtype, progress, quantize, adapter, tensor_parallel_size)
    return QwenLM(ckpt.model, ckpt.tokenizer, ckpt.generation_config, ckpt.folder, engine_config)


class QwenLM:
    def __init__(self, model: QWenLMHeadModel, tokenizer: Tokenizer, generation_config: GenerationConfig,
                 path: Path | None = None, engine_config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.path = path
        self.engine_config = engine_config
        self._engine: LLMEngine | None = None
        self._inbox: dict[str, list] = {}

    # ---- settings ----
    def sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams from the generation config plus per-call overrides (GenerationConfig names such as
        top_p, temperature, max_new_tokens, do_sample, or SamplingParams names such as max_tokens, stop).
        A bad name or value is a ParamError naming it, raised before any work starts."""
        gen_names = {f.name for f in dataclasses.fields(GenerationConfig)}
        param_names = {f.name for f in dataclasses.fields(SamplingParams)}
        rest = {k: v for k, v in overrides.items() if k not in gen_names}
        unknown = sorted(set(rest) - param_names)
        if unknown:
            raise ParamError(unknown[0], f"unknown generation setting(s): {', '.join(unknown)}; known: "
                                         f"{', '.join(sorted(gen_names | param_names))}")
        gen = self.generation_config.replace(**{k: v for k, v in overrides.items() if k in gen_names})
        if "temperature" in overrides and overrides["temperature"] == 0:
            gen = gen.replace(do_sample=False)
        params = SamplingParams.from_generation_config(gen, **rest)
        params.check_vocab(self.tokenizer.n_vocab)
        return params

    # ---- text streams ----
    @property
    def engine(self) -> LLMEngine:
        """The serving engine behind every call, built on first use (KV pool, CUDA graphs on a GPU)."""
        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer, self.engine_config)
        return self._engine

    def _stream_texts(self, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int]):
        """Yield per step a list of (text delta, finish_reason) per prompt, through the engine.

        Stop strings are cut and never leaked; a caller that stops iterating aborts its requests. Outputs
        that belong to another stream of this object are kept in an inbox for it, so streams may interleave.
        """
        engine = self.engine
        params = dataclasses.replace(params, stop_token_ids=sorted(stop_ids | set(params.stop_token_ids)))
        rids = []
        try:
            for i, prompt in enumerate(prompts):
                seed = None if params.seed is None else wrap_seed(params.seed + i)
                rids.append(engine.add_request(None, prompt, dataclasses.replace(params, seed=seed)))
                self._inbox[rids[-1]] = []
            done = [False] * len(rids)
            while not all(done):
                if not any(self._inbox[r] for r in rids):
                    for out in engine.step():
                        if out.request_id in self._inbox:
                            self._inbox[out.request_id].append(out)
                step = []
                for b, rid in enumerate(rids):
                    delta, reason = "", None
                    for out in self._inbox[rid]:
                        delta += out.outputs[0].text_delta
                        reason = out.outputs[0].finish_reason
                        if reason == "error":  # never hand back a cut reply as if it were whole
                            raise RequestError(f"generation failed: {out.error}")
                    self._inbox[rid].clear()
                    done[b] = done[b] or reason is not None
                    step.append((delta, reason))
                yield step
        finally:
            for rid in rids:
                engine.abort(rid)
                self._inbox.pop(rid, None)

    def generate(self, prompt: str | list[str], chat_format: str | None = None, **overrides) -> str | list[str]:
        """Complete raw text (base models) or, with chat_format="chatml", answer each prompt as a chat query.
        Batches are left-padded and run together; each row gives what it would give alone."""
        single = isinstance(prompt, str)
        if not single and not (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)):
            raise ParamError("prompt", f"prompt must be a string or a list of strings, got {prompt!r:.80}")
        if chat_format not in (None, *CHAT_FORMATS):
            raise ParamError("chat_format", f"chat_format must be None, 'raw' or 'chatml', got {chat_format!r}")
        prompts = [prompt] if single else list(prompt)
        params = self.sampling_params(**overrides)
        chat = chat_format == "chatml"
        ids = [build_chat_prompt(self.tokenizer, p, max_window_size=self.generation_config.max_window_size)[1]
               if chat else self.tokenizer.encode(p) for p in prompts]
        stop_ids = chat_stop_ids(self.tokenizer) if chat else {self.tokenizer.eod_id}
        texts = ["" for _ in prompts]
        for step in self._stream_texts(ids, params, stop_ids):
            for b, (delta, _) in enumerate(step):
                texts[b] += delta
        texts = [t.strip() for t in texts] if chat else texts
        return texts[0] if single else texts

    def chat_stream(self, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
                    **overrides) -> Iterator[str]:
        """Yield the reply as text deltas. The caller appends (query, reply) to its history.
        Arguments are checked when called, before the first delta is asked for."""
        for name, value in (("query", query), ("system", system)):
            if not isinstance(value, str):
                raise ParamError(name, f"{name} must be a string, got {value!r:.80}")
        history = validate_history(history)
        window = check_int("max_window_size", overrides.pop("max_window_size",
                                                            self.generation_config.max_window_size), 1)
        params = self.sampling_params(**overrides)
        _, ids = build_chat_prompt(self.tokenizer, query, history, system, window)
        return self._reply_deltas(ids, params)

    def _reply_deltas(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        started = False
        for step in self._stream_texts([ids], params, chat_stop_ids(self.tokenizer)):
            delta = step[0][0]
            if not started:  # the official reply is strip()-ed: drop leading whitespace of the stream
                delta = delta.lstrip()
                started = bool(delta)
            if delta:
                yield delta

    def chat(self, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
             **overrides) -> tuple[str, History]:
        """(response, history + [(query, response)]); the caller's history list is not modified."""
        history = validate_history(history)
        response = "".join(self.chat_stream(query, history, system, **overrides)).strip()
        return response, history + [(query, response)]
