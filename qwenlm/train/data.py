"""Training data: files -> tokenized samples with labels, and a report of what was kept.

Length handling, against the official `finetune.py` (spec §15), which pads every sample to
`model_max_length` with <|endoftext|> and cuts longer ones at `max_len` (right side):
- no padding to max_len here: samples are packed (`packing.pack`) or padded per batch (`packing.pad_batch`);
- a sample longer than max_len is an error by default (a silent cut can drop the whole answer);
  `on_long="skip"` drops and counts it, `on_long="truncate"` is the official hard cut, counted;
- the official `attention_mask = input_ids != pad_id` also masks genuine <|endoftext|> tokens inside the
  data; packing attends by sample boundaries instead, so such tokens are attended to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwenlm.tokenizer import Tokenizer
from qwenlm.train.formats import DataError, parse_sample, read_samples
from qwenlm.train.labels import IGNORE_TOKEN_ID, encode_conversation

ON_LONG = ("error", "skip", "truncate")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    file: str
    index: int


@dataclass
class DataReport:
    samples: int = 0  # kept
    tokens: int = 0
    trained_tokens: int = 0  # loss targets: labels != IGNORE_TOKEN_ID after the first (never predicted)
    truncated: int = 0
    skipped_long: int = 0
    dropped_first_turn: int = 0  # conversations that opened with an assistant turn (official: dropped)
    files: list[str] = field(default_factory=list)

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.tokens += len(sample.input_ids)
        self.trained_tokens += sum(1 for t in sample.labels[1:] if t != IGNORE_TOKEN_ID)

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.tokens} tokens, {self.trained_tokens} trained "
                f"({self.trained_share:.1%}); truncated {self.truncated}, skipped as too long {self.skipped_long}, "
                f"opening assistant turn dropped {self.dropped_first_turn}; files: {', '.join(self.files)}")


def load_training_data(paths: str | Path | list, tok: Tokenizer, max_len: int, assistant_only: bool = False,
                       on_long: str = "error") -> tuple[list[Sample], DataReport]:
    """Read, check and tokenize every sample of the given files, in order."""
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    report = DataReport(files=[str(p) for p in paths])
    samples: list[Sample] = []
    for path in paths:
        for i, raw in enumerate(read_samples(path)):
            conv = parse_sample(raw, str(path), i)
            report.dropped_first_turn += conv.dropped_first_turn
            ids, labels = encode_conversation(tok, conv, assistant_only)
            if len(ids) > max_len:
                if on_long == "error":
                    raise DataError(path, i, None, f"{len(ids)} tokens, over max_len={max_len} "
                                                   "(on_long='skip' drops such samples, 'truncate' cuts them)")
                if on_long == "skip":
                    report.skipped_long += 1
                    continue
                ids, labels = ids[:max_len], labels[:max_len]
                report.truncated += 1
            sample = Sample(ids, labels, str(path), i)
            report.add(sample)
            samples.append(sample)
    return samples, report
