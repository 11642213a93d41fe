"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time (nano-vllm's llm_engine, plus text).

Each step: the scheduler picks a batch, the runner computes it and samples, and the engine appends the
new tokens, detokenizes them incrementally, applies stop ids / stop strings / max_tokens, and frees the
blocks of finished sequences. `AsyncEngine` (async_engine.py) drives `step()` from a background thread.

Steps overlap (EngineConfig.overlap_steps, the "async scheduling" of vLLM / mini-sglang): `step()` launches
step N+1 while step N is still on the device, feeding N's sampled tokens to N+1 as input ids on the device,
and only then waits for N's tokens and processes them on the host (detokenize, stops, outputs) while N+1
runs. Until then N's tokens are PENDING placeholders in the sequences (sequence.py). A sequence that N
finishes (stop id / stop string) has one extra token computed by N+1, which is discarded; its blocks are
freed when N is processed, and abort frees them at once (stream order keeps the in-flight writes ahead of
any later owner's). Sequences that N brings to max_tokens are left out of N+1; a step that would need a
preemption, or a repetition penalty over a pending token, is scheduled after N is processed instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import count

from qwenlm.engine.config import EngineConfig
from qwenlm.engine.fusion import fuse_gate_up
from qwenlm.engine.kv_cache import BlockManager
from qwenlm.engine.outputs import CompletionOutput, RequestError, RequestOutput
from qwenlm.engine.runner import LaunchedStep, ModelRunner
from qwenlm.engine.sampler import sampling_rows, unpack_details
from qwenlm.engine.scheduler import Scheduler
from qwenlm.engine.sequence import PENDING, Sequence
from qwenlm.loading import load_checkpoint
from qwenlm.model.qwen import ntk_alpha
from qwenlm.sampling import SamplingParams, check_in_vocab, wrap_seed
from qwenlm.tokenizer import IncrementalDetokenizer, StopStringMatcher

DEFAULT_EOS_ID = 151643  # <|endoftext|>, generation_config.json's eos_token_id (spec §12.3)


class _TextState:
    """Incremental text of one sample: detokenizer, stop-string matcher, text so far and this step's delta."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.matcher = StopStringMatcher(params.stop)
        self.text = ""
        self.delta = ""

    def push(self, token_id: int) -> bool:
        """Add a token's text; True when a stop string completed (the text is cut before it)."""
        if self.detok is None:
            return False
        emitted, hit = self.matcher.push(self.detok.add(token_id))
        self.text += emitted
        self.delta += emitted
        return hit

    def close(self) -> None:
        if self.detok is None or self.matcher.stopped:
            return
        emitted, hit = self.matcher.push(self.detok.flush())
        tail = "" if hit else self.matcher.flush()
        self.text += emitted + tail
        self.delta += emitted + tail


def checked_prompt_ids(prompt: list[int] | str, params: SamplingParams, tokenizer, max_model_len: int,
                       vocab_size: int, limit_note: str = "") -> list[int]:
    """A request's prompt ids (a text prompt tokenized), or ValueError for a request that can never run: the
    checks every engine front makes before a request reaches a step (LLMEngine, the engine process's client).
    An id outside the model's vocabulary would fail the step of every request in it (on a GPU the embedding's
    device-side assert ends the process), so each id is checked here."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = [int(t) for t in prompt]
    if not prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    check_in_vocab("prompt", prompt_ids, vocab_size)
    check_in_vocab("candidate_token_ids", params.candidate_token_ids, vocab_size)  # gathered in the step
    if len(prompt_ids) >= max_model_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room for a reply: the context is "
                         f"{max_model_len} tokens, prompt + reply" + (f" ({limit_note})" if limit_note else ""))
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer; the engine has none")
    return prompt_ids


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None  # set when the request failed alone (finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        model_len = self.config.max_model_len or cfg.max_position_embeddings
        self.eos_token_id = getattr(tokenizer, "eos_id", DEFAULT_EOS_ID)
        if self.config.fuse_mlp:
            fuse_gate_up(self.model)  # in place; the state dict keeps the official w1 / w2 names
        self.runner = ModelRunner(model, self.config, model_len)
        self.blocks = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        # The true context: prompt + reply tokens one sequence can reach, the model's limit or what the whole
        # KV pool holds, whichever is smaller. A sequence that reaches it finishes with "length".
        self.max_model_len = min(model_len, self.blocks.num_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.blocks, self.max_model_len)
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet processed
        self.last_step_was_prefill = False  # kind of the step whose tokens the last step() processed
        self.requests: dict[str, Request] = {}
        self._seeds = random.Random(self.config.seed)
        self._auto_ids = count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # ---- requests ---------------------------------------------------------------------------------
    def make_request(self, prompt: list[int] | str, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        cfg = self.model.config
        prompt_ids = checked_prompt_ids(prompt, params, self.tokenizer, self.max_model_len, cfg.vocab_size,
                                        f"max_model_len: the model's limit or what the KV cache of "
                                        f"{self.blocks.num_blocks} x {self.config.block_size} tokens holds")
        alpha = ntk_alpha(len(prompt_ids), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
        request_id = request_id if request_id is not None else f"req-{next(self._auto_ids)}"
        req = Request(request_id, prompt_ids, params)
        for i in range(params.n):
            seed = wrap_seed(params.seed + 1_000_003 * i) if params.seed is not None else self._seeds.getrandbits(32)
            seq = Sequence(request_id, i, prompt_ids, params, seed, alpha, req.seqs[0] if req.seqs else None)
            seq.detok = _TextState(self.tokenizer, params)
            req.seqs.append(seq)
        try:  # the step builds every row of its batch at once: a row that cannot be built must fail here
            sampling_rows(req.seqs[:1])
        except Exception as e:
            raise ValueError(f"the sampling parameters of request {request_id!r} cannot be used: {e}") from e
        return req

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str | None, prompt: list[int] | str,
                    params: SamplingParams | None = None) -> str:
        req = self.make_request(prompt, params, request_id)
        self.add(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last output (finish_reason "abort")."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                try:
                    seq.detok.close()
                except Exception:  # an abort always succeeds; the held-back text is dropped instead
                    pass
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Process one step's tokens (launching the next step first when it can overlap)."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            step = self._launch(batch, None)
        if self._can_look_ahead():
            batch = self.scheduler.schedule(lookahead=True)
            if batch is not None:
                self._in_flight = self._launch(batch, step)
        return self._process(step)

    def _can_look_ahead(self) -> bool:
        if not self.config.overlap_steps:
            return False
        # The batched repetition penalty reads the sequences' tokens on the host: none may be pending.
        return not any(s.num_pending and s.params.repetition_penalty != 1.0 for s in self.scheduler.running)

    def _launch(self, batch, prev: LaunchedStep | None) -> LaunchedStep:
        step = self.runner.launch(batch, prev)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            if seq.num_computed <= seq.num_known:  # not when its input is PENDING: then in _process
                self.blocks.commit(seq)  # now, so a sibling or a request admitted next can hit these blocks
        for span in step.prompt_spans:
            span.seq.prompt_logprobs_next = span.first + span.count
        for seq in step.sample_seqs:
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
        if batch.is_prefill:
            self.num_prompt_tokens += sum(batch.num_tokens)
        return step

    def _process(self, step: LaunchedStep) -> list[RequestOutput]:
        tokens, columns, prompt_rows = self.runner.resolve(step)
        self.last_step_was_prefill = step.batch.is_prefill
        if prompt_rows is not None:
            self._add_prompt_logprobs(step.prompt_spans, prompt_rows)
        touched: dict[str, Request] = {}
        for i, (seq, token) in enumerate(zip(step.sample_seqs, tokens)):
            if seq.is_finished:  # aborted, or finished by the step before: its token is discarded
                continue
            req = touched[seq.request_id] = self.requests[seq.request_id]
            try:
                self._append(seq, token, None if columns is None else columns[i], step.top_k)
            except Exception as e:  # detokenizing or stop handling failed: this request alone fails
                self._fail(req, e)
        for seq in step.batch.seqs:
            if not seq.is_finished:
                self.blocks.commit(seq)  # after _append: the blocks it hashes hold no PENDING token
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    @staticmethod
    def _add_prompt_logprobs(spans, rows: list[list[float]]) -> None:
        """Append each span's prompt logprobs (and top-k) to its sequence, in prompt order."""
        k = max(span.seq.params.prompt_logprobs for span in spans)
        at = 0
        for span in spans:
            seq, n = span.seq, span.seq.params.prompt_logprobs
            for row in rows[at:at + span.count] if not seq.is_finished else ():  # aborted: nothing to add
                seq.prompt_logprobs.append(row[0])
                seq.prompt_top_logprobs.append({int(i): lp for i, lp in zip(row[1:1 + n], row[1 + k:1 + k + n])})
            at += span.count

    @staticmethod
    def _record_logprobs(seq: Sequence, column: list[float] | None, top_k: int) -> None:
        if column is None:
            return
        logprob, top, cands = unpack_details(column, seq.params, top_k)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        if seq.top_logprobs is not None:
            seq.top_logprobs.append(top)
        if seq.candidate_logprobs is not None:
            seq.candidate_logprobs.append(cands)

    def _append(self, seq: Sequence, token: int, column: list[float] | None, top_k: int = 0) -> None:
        """Fill in the sequence's oldest PENDING token (or finish it there). column: the token's logprob
        details (runner.resolve), recorded also for a stop token, which ends the sequence without joining it."""
        p = seq.params
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            self._record_logprobs(seq, column, top_k)
            seq.stop_token_id = token
            return self._finish(seq, "stop")  # drops the placeholder with the rest
        at = len(seq.token_ids) - seq.num_pending
        seq.token_ids[at] = token
        seq.num_pending -= 1
        self.num_generation_tokens += 1
        self._record_logprobs(seq, column, top_k)
        if seq.detok.push(token):
            return self._finish(seq, "stop")
        if at + 1 - seq.num_prompt_tokens >= p.max_tokens or at + 1 >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.detok.close()
        self.scheduler.finish(seq, reason)

    def _fail(self, req: Request, exc: Exception) -> None:
        req.error = f"{type(exc).__name__}: {exc}"
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.detok
            outs.append(CompletionOutput(seq.index, list(seq.output_token_ids), text.text, text.delta,
                                         _copy(seq.logprobs), seq.finish_reason, _copy(seq.top_logprobs),
                                         _copy(seq.candidate_logprobs), seq.stop_token_id))
            text.delta = ""
        first = req.seqs[0]
        # Prompt logprobs are whole before any output (outputs follow sampled tokens, which follow the prompt;
        # an aborted request's stop growing) and never change after: the lists are handed out as they are.
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, req.finished,
                             first.num_cached_tokens, req.error, first.prompt_logprobs, first.prompt_top_logprobs)

    # ---- whole batches and stats ------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (token-id lists or strings) to completion; outputs in prompt order. A request that failed
        (finish_reason "error") raises RequestError once all have finished."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        failed = [final[i] for i in ids if final[i].error]
        if failed:
            raise RequestError(f"request {failed[0].request_id!r} failed: {failed[0].error}")
        return [final[i] for i in ids]

    def shutdown(self) -> None:
        """Stop a tensor-parallel model's other ranks (their processes exit); nothing to do for one process."""
        self.shutdown_model(self.model)

    @staticmethod
    def shutdown_model(model) -> None:
        workers = getattr(model, "tp_workers", None)
        if workers is not None:
            workers.shutdown()

    def stats(self) -> dict:
        sched = self.scheduler
        return {
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "num_requests": len(self.requests),
            "kv_usage": self.blocks.usage,
            "num_blocks": self.blocks.num_blocks,
            "num_free_blocks": self.blocks.num_free_blocks,
            "prefix_cache_hit_rate": self.blocks.hit_rate,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
            "num_preemptions": sched.num_preemptions,
        }


def _copy(values: list | None) -> list | None:
    """A snapshot of a growing list for an output (its dict / list entries are never changed once added)."""
    return None if values is None else list(values)


class LLM(LLMEngine):
    """Offline entry point: `LLM(path_or_model).generate(prompts, params)`.

    model_or_path: a checkpoint folder (or hub name), or an already loaded QWenLMHeadModel (then pass
    `tokenizer` for text prompts and stop strings). tensor_parallel_size N > 1 (a folder): the model split over
    N processes, this one rank 0 (docs/parallel.md); `shutdown()` stops the others.
    """

    def __init__(self, model_or_path, tokenizer=None, config: EngineConfig | None = None, device=None,
                 dtype=None, tensor_parallel_size: int = 1, **config_kwargs):
        if config is not None and config_kwargs:
            raise ValueError("pass either an EngineConfig or EngineConfig keyword arguments, not both")
        config = config or EngineConfig(**config_kwargs)
        if not hasattr(model_or_path, "config"):
            ckpt = load_checkpoint(model_or_path, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
            model_or_path, tokenizer = ckpt.model, tokenizer or ckpt.tokenizer
        elif tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size needs a checkpoint folder: each rank loads its own slice of it")
        try:
            super().__init__(model_or_path, tokenizer, config)
        except BaseException:
            self.shutdown_model(model_or_path)
            raise
