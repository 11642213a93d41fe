"""Sequence: the state of one sample (one of a request's n) as it moves through the engine."""

from __future__ import annotations

import enum
from itertools import count

from qwenlm.sampling import SamplingParams


PENDING = -1  # placeholder id of a sampled token still on the device (never a real token id)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted (or preempted): owns no KV blocks
    RUNNING = "running"  # owns blocks; prefilling or decoding
    FINISHED = "finished"


_ids = count()


class Sequence:
    """Token ids (prompt + generated), KV bookkeeping and per-sample outputs.

    `num_computed` counts tokens whose K/V are in the cache (or are being written by a launched step).
    While num_computed < len - 1 the sequence is prefilling (in chunks); afterwards each decode step
    computes the last token.

    With overlapped steps the token a launched step samples is not known on the host until the step is
    resolved: it is held as a PENDING placeholder at the end of `token_ids` (so lengths, positions and
    block needs are already right) and `num_pending` counts them; the engine fills it in or drops it.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, ntk_alpha: float, first_sibling: "Sequence | None" = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.first_sibling = first_sibling  # sample 0 of the same request (None for sample 0)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed  # counter-based sampling noise comes from (seed, position)
        # Dynamic-NTK alpha is chosen once from the prompt length and frozen for the whole generation
        # (spec §5.4); it also salts the prefix-cache hashes, since cached keys were rotated with it.
        self.ntk_alpha = ntk_alpha
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        self.num_hashed_blocks = 0  # leading blocks already registered in the prefix cache
        self.last_hash: int | None = None  # hash of the last of those
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the last admission
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.top_logprobs else None
        self.candidate_logprobs: list[list[float]] | None = [] if params.candidate_token_ids else None
        self.stop_token_id: int | None = None
        # Prompt logprobs belong to the request: sample 0 computes them. Row p of a prefill gives the logprob of
        # prompt token p + 1; `prompt_logprobs_next` is the first row not yet launched (a preempted sequence is
        # recomputed, but its rows are not taken twice).
        self.wants_prompt_logprobs = params.prompt_logprobs is not None and first_sibling is None
        self.prompt_logprobs_next = 0
        self.prompt_logprobs: list[float | None] | None = [None] if self.wants_prompt_logprobs else None
        self.prompt_top_logprobs: list[dict | None] | None = [None] if self.wants_prompt_logprobs else None
        self.finish_reason: str | None = None
        self.detok = None  # incremental detokenizer / stop matcher, set by the engine
        self.num_pending = 0  # trailing placeholders: tokens sampled on the device, not yet read back

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (pending placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_known(self) -> int:
        return len(self.token_ids) - self.num_pending

    def drop_pending(self) -> None:
        """Forget the placeholders (the sequence finished: their tokens are discarded)."""
        del self.token_ids[self.num_known:]
        self.num_pending = 0

    @property
    def prompt_logprobs_left(self) -> bool:
        return self.wants_prompt_logprobs and self.prompt_logprobs_next < self.num_prompt_tokens - 1

    @property
    def max_cached_tokens(self) -> int:
        """Tokens the prefix cache may serve at admission: a cached position computes no logits, so none past the
        first prompt position whose logprobs are still to be computed."""
        return self.prompt_logprobs_next if self.prompt_logprobs_left else len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
