"""Base-model multiple-choice scoring: the answer is the letter whose token is most probable next.

As evaluate_{mmlu,ceval,cmmlu}.py do: the last-position distribution, restricted to the four letter
tokens (" A".." D" with a leading space for MMLU, whose prompt ends "Answer:"; "A".."D" for C-Eval and
CMMLU, whose prompt ends "答案："), argmax, first letter on a tie (numpy's argmax).

The model is reached through `next_token_logprobs(prompts, candidate_ids) -> list[list[float]]`: for each
prompt, the log-probability (over the full vocabulary) of each candidate token coming next. Any backend
fits: a plain model forward (`qwenlm.eval.model_logprobs`), the engine, a server's logprobs route.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from qwenlm.eval.data import LETTERS, ChoiceItem
from qwenlm.eval.prompts import N_SHOT, base_choice_prompt, few_shot_prefix
from qwenlm.tokenizer import Tokenizer

NextTokenLogprobs = Callable[[list[str], list[int]], list[list[float]]]

LETTER_TEXT = {"mmlu": (" A", " B", " C", " D"), "ceval": LETTERS, "cmmlu": LETTERS}


def letter_ids(tokenizer: Tokenizer, benchmark: str) -> list[int]:
    """Token ids of the four answer letters; each must be a single token (it is, in Qwen's vocabulary)."""
    ids = []
    for text in LETTER_TEXT[benchmark]:
        toks = tokenizer.encode(text)
        if len(toks) != 1:
            raise ValueError(f"answer letter {text!r} is {len(toks)} tokens in this vocabulary, expected 1")
        ids.append(toks[0])
    return ids


@dataclass(frozen=True)
class ChoiceRecord:
    subject: str
    row: int
    answer: str | None
    pred: str
    probs: tuple[float, ...]  # over the four letters, renormalised to sum to 1

    @property
    def correct(self) -> bool:
        return self.pred == self.answer


def pick_letter(logprobs: list[float]) -> tuple[str, tuple[float, ...]]:
    """The letter with the highest log-probability and the letters' renormalised probabilities.

    The official scripts store softmax(p_A..p_D) of the probabilities (a second softmax, which flattens
    them); the argmax is the same, so the prediction matches theirs while our probs sum the letters' mass."""
    if len(logprobs) != len(LETTERS) or any(math.isnan(x) for x in logprobs):
        raise ValueError(f"expected 4 finite log-probabilities, got {logprobs}")
    best = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))  # first index wins a tie
    top = max(logprobs)
    if top == -math.inf:
        return LETTERS[best], tuple(0.25 for _ in logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    total = sum(weights)
    return LETTERS[best], tuple(w / total for w in weights)


def score_choice_benchmark(benchmark: str, test: dict[str, list[ChoiceItem]], dev: dict[str, list[ChoiceItem]],
                           tokenizer: Tokenizer, next_token_logprobs: NextTokenLogprobs,
                           k: int = N_SHOT, batch_size: int = 16) -> list[ChoiceRecord]:
    """Score every test item of every subject with its subject's k-shot dev prefix."""
    ids = letter_ids(tokenizer, benchmark)
    records = []
    for subject, items in test.items():
        if subject not in dev:
            raise ValueError(f"{benchmark}: no dev split for subject {subject!r} (needed for the few-shot prefix)")
        prefix = few_shot_prefix(benchmark, subject, dev[subject], k)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            out = next_token_logprobs([base_choice_prompt(benchmark, prefix, it) for it in chunk], ids)
            if len(out) != len(chunk):
                raise ValueError(f"next_token_logprobs returned {len(out)} rows for {len(chunk)} prompts")
            for item, lps in zip(chunk, out):
                pred, probs = pick_letter(list(lps))
                records.append(ChoiceRecord(subject, item.row, item.answer, pred, probs))
    return records
