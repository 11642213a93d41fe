"""Continuous batching: which sequences run this step, and how many tokens each computes.

A step is either a prefill step (chunks of prompts under a token budget, eager) or a decode step (one
token per decoding sequence, replayed from a CUDA graph). While sequences are decoding, prefill and
decode steps alternate, so a long prompt advances one chunk at a time and never stalls running
streams for more than one chunk. When the pool runs out of blocks, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed (its own
freed blocks usually come back as prefix-cache hits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwenlm.engine.config import EngineConfig
from qwenlm.engine.kv_cache import BlockManager
from qwenlm.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes this step

    @property
    def sample_seqs(self) -> list[Sequence]:
        """Sequences whose last token is computed this step: they get a new token."""
        return [s for s, n in zip(self.seqs, self.num_tokens) if s.num_computed + n == len(s)]


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int | None = None):
        self.config = config
        self.max_model_len = max_model_len or config.max_model_len or 1 << 62
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_was_prefill = False
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.drop_pending()  # a token still in flight for it is discarded when its step resolves
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def preempt(self, seq: Sequence) -> None:
        assert not seq.num_pending, "preempting a sequence with a token in flight"
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self, lookahead: bool = False) -> ScheduledBatch | None:
        """The next batch. lookahead=True: scheduled while the previous step is still in flight (its sampled
        tokens are PENDING placeholders): never preempts (None instead), and leaves out sequences that the
        in-flight step brings to max_tokens / max_model_len, since they are finished whatever token it samples."""
        while self.running or self.waiting:
            decoding = any(not s.is_prefilling for s in self.running)
            wants_prefill = bool(self.waiting) or any(s.is_prefilling for s in self.running)
            if wants_prefill and (not decoding or not self.last_was_prefill):
                batch = self._schedule_prefill()
                if batch is not None:
                    self.last_was_prefill = True
                    return batch
            if decoding:
                batch = self._schedule_decode(lookahead)
                if batch is not None:
                    self.last_was_prefill = False
                    return batch
            if lookahead:
                return None  # the synchronous schedule that follows may preempt
            if wants_prefill and decoding:
                continue  # decode preempted everything it could; prefill gets the freed blocks
            if not self.running:
                seq = self.waiting[0]
                raise RuntimeError(f"a sequence of {len(seq)} tokens does not fit the KV cache of "
                                   f"{self.blocks.num_blocks} blocks x {self.blocks.block_size} tokens")
            self.preempt(self.running[-1])  # prefilling sequences hold the pool and none can advance
        return None

    def _done_after_pending(self, seq: Sequence) -> bool:
        """The in-flight step's token ends the sequence by length (token_ids holds its placeholder)."""
        return bool(seq.num_pending) and (len(seq) - seq.num_prompt_tokens >= seq.params.max_tokens
                                          or len(seq) >= self.max_model_len)

    def _chunk(self, seq: Sequence, budget: int, partial_ok: bool) -> int:
        """Tokens of `seq` to compute now (blocks taken), or 0."""
        n = min(len(seq) - seq.num_computed, budget)
        if self.blocks.ensure(seq, seq.num_computed + n):
            return n
        if not partial_ok:
            return 0
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size - seq.num_computed
        n = min(n, room)
        return n if n > 0 and self.blocks.ensure(seq, seq.num_computed + n) else 0

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        seqs, counts = [], []
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = self._chunk(seq, budget, partial_ok=True)
                if n:
                    seqs.append(seq)
                    counts.append(n)
                    budget -= n
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            first = seq.first_sibling
            if first is not None and (first.status is SeqStatus.WAITING
                                      or (first.status is SeqStatus.RUNNING and first.is_prefilling)):
                continue  # let the first sample compute the shared prompt; siblings then hit the cache
            self.blocks.admit(seq)
            n = self._chunk(seq, budget, partial_ok=False)
            if not n:
                self.blocks.release(seq)
                break
            self.blocks.count_prefix(seq)
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(True, seqs, counts) if seqs else None

    def _schedule_decode(self, lookahead: bool = False) -> ScheduledBatch | None:
        seqs = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            i += 1
            if seq.is_prefilling or (lookahead and self._done_after_pending(seq)):
                continue
            while not self.blocks.ensure(seq, len(seq)):
                if lookahead:
                    return None  # blocks already taken stay in the tables: the next schedule uses them
                victim = self.running[-1]
                if victim in seqs:
                    seqs.remove(victim)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                seqs.append(seq)
        return ScheduledBatch(False, seqs, [1] * len(seqs)) if seqs else None
