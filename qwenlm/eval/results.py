"""Totals as the official scripts compute them, and a Markdown table beside the published figures.

- MMLU (cal_mmlu): micro-average over all questions; each category the same over its subjects' questions.
- C-Eval (cal_ceval) and CMMLU (cal_cmmlu): macro-average of the per-subject accuracies; categories
  likewise; C-Eval adds "Hard" over its eight hard subjects.
- GSM8K, HumanEval: the share of correct items (pass@1 for HumanEval with one greedy sample).
All figures are percentages.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from qwenlm.eval.subjects import CATEGORIES, CEVAL_HARD

# Qwen README: Qwen-7B-Chat "Quantization" table (BF16; MMLU 0-shot, C-Eval val, GSM8K, HumanEval) and the
# Qwen-7B base model table (v1.1; MMLU and C-Eval 5-shot, GSM8K 8-shot, HumanEval 0-shot).
OFFICIAL = {
    "Qwen-7B-Chat": {"MMLU": 55.8, "C-Eval": 59.7, "GSM8K": 50.3, "HumanEval": 37.2},
    "Qwen-7B": {"MMLU": 58.2, "C-Eval": 63.5, "CMMLU": 62.2, "GSM8K": 51.7, "HumanEval": 29.9},
}
_NAMES = {"mmlu": "MMLU", "ceval": "C-Eval", "cmmlu": "CMMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval"}


@dataclass
class Summary:
    overall: float
    count: int
    by_subject: dict[str, float] = field(default_factory=dict)
    by_category: dict[str, float] = field(default_factory=dict)


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def accuracy(records) -> Summary:
    """Share of records whose `.correct` is true (GSM8K, HumanEval)."""
    records = list(records)
    return Summary(_pct(sum(r.correct for r in records), len(records)), len(records))


def summarize_choice(benchmark: str, records) -> Summary:
    """Records with `.subject` and `.correct` (base or chat) of one multiple-choice benchmark."""
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_subject[r.subject].append(r.correct)
    by_subject = {s: _pct(sum(v), len(v)) for s, v in per_subject.items()}
    count = sum(len(v) for v in per_subject.values())
    groups = {cat: [s for s in subs if s in per_subject] for cat, subs in CATEGORIES[benchmark].items()}
    if benchmark == "ceval":
        groups["Hard"] = [s for s in CEVAL_HARD if s in per_subject]
    if benchmark == "mmlu":  # micro: pool the questions
        overall = _pct(sum(sum(v) for v in per_subject.values()), count)
        by_category = {cat: _pct(sum(sum(per_subject[s]) for s in subs), sum(len(per_subject[s]) for s in subs))
                       for cat, subs in groups.items() if subs}
    else:  # macro: average the subjects' accuracies
        overall = sum(by_subject.values()) / len(by_subject) if by_subject else 0.0
        by_category = {cat: sum(by_subject[s] for s in subs) / len(subs) for cat, subs in groups.items() if subs}
    return Summary(overall, count, by_subject, by_category)


def markdown_table(scores: dict[str, float], model: str = "Qwen-7B-Chat") -> str:
    """scores: benchmark ("mmlu", "ceval", ... or the display name) -> percentage. Official figures beside
    them where `model` has one; a benchmark without one shows "-"."""
    official = OFFICIAL.get(model, {})
    lines = [f"| benchmark | measured | official ({model}) | difference |", "| --- | ---: | ---: | ---: |"]
    for key, value in scores.items():
        name = _NAMES.get(key, key)
        ref = official.get(name)
        ref_text, diff = ("-", "-") if ref is None else (f"{ref:.1f}", f"{value - ref:+.1f}")
        lines.append(f"| {name} | {value:.1f} | {ref_text} | {diff} |")
    return "\n".join(lines) + "\n"
