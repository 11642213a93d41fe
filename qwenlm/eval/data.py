"""Readers of the benchmarks' official file layouts. Each yields typed items; a malformed file raises
`EvalDataError` naming the file, the row or line, and the field.

Layouts (spec §17; the official Qwen `eval/` scripts' download notes):
- MMLU (hendrycks data.tar): `{root}/{dev,test}/{subject}_{dev,test}.csv`, no header, columns
  question, A, B, C, D, answer.
- C-Eval (ceval-exam.zip): `{root}/{dev,val,test}/{subject}_{split}.csv`, header `id,question,A,B,C,D,answer`
  (dev adds `explanation`; test has no answers).
- CMMLU (cmmlu_v1_0_1.zip): `{root}/{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer`.
- GSM8K: jsonl, one `{"question", "answer"}` object a line, the answer ending in `#### N`.
- HumanEval: `HumanEval.jsonl` or `.jsonl.gz`, fields task_id, prompt, canonical_solution, test, entry_point.

Cells are kept verbatim. The official scripts read the csv files with pandas, which turns cells such as
"None" or "NA" into NaN (written "nan" into the prompt) and all-numeric columns into numbers; we do not
copy that, so a few prompts can differ from theirs (UNVERIFIED how much it moves a score).
"""
from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from qwenlm.eval.subjects import SUBJECTS
from qwenlm.files import read_json_lines

LETTERS = ("A", "B", "C", "D")


class EvalDataError(ValueError):
    """A benchmark file that is missing or not in the official layout."""


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question (MMLU, C-Eval, CMMLU)."""
    subject: str
    row: int  # 1-based data row in its file (header not counted)
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # "A".."D"; None where the split has no answers (C-Eval test)


@dataclass(frozen=True)
class GSM8KItem:
    line: int
    question: str
    answer: str  # the full worked solution, ending in "#### N"


@dataclass(frozen=True)
class HumanEvalItem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


_LAYOUT = {  # benchmark -> (file name pattern, header or None, column names used)
    "mmlu": ("{subject}_{split}.csv", None, ("question", "A", "B", "C", "D", "answer")),
    "ceval": ("{subject}_{split}.csv", True, ("question", "A", "B", "C", "D", "answer")),
    "cmmlu": ("{subject}.csv", True, ("Question", "A", "B", "C", "D", "Answer")),
}


def choice_file(benchmark: str, root: str | Path, split: str, subject: str) -> Path:
    pattern = _LAYOUT[benchmark][0]
    return Path(root) / split / pattern.format(subject=subject, split=split)


def read_choice_file(benchmark: str, path: str | Path, subject: str, need_answer: bool = True) -> list[ChoiceItem]:
    """Read one subject's csv file of `benchmark` ("mmlu", "ceval" or "cmmlu")."""
    if benchmark not in _LAYOUT:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(_LAYOUT)}")
    path = Path(path)
    _, has_header, cols = _LAYOUT[benchmark]
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found (expected the official {benchmark} layout)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: not a readable UTF-8 csv file ({e})") from None
    if has_header:
        if not rows:
            raise EvalDataError(f"{path}: empty file, expected a header row")
        header, rows = rows[0], rows[1:]
        missing = [c for c in cols if c not in header]
        if missing:
            raise EvalDataError(f"{path}: header {header} lacks column {missing[0]!r}")
        index = [header.index(c) for c in cols]
    else:
        index = list(range(6))
    items = []
    for n, cells in enumerate(rows, start=1):
        if not has_header and len(cells) != 6:
            raise EvalDataError(f"{path}: row {n}: {len(cells)} columns, expected 6 "
                                f"(question, A, B, C, D, answer)")
        if has_header and len(cells) < len(header):
            raise EvalDataError(f"{path}: row {n}: {len(cells)} columns, the header has {len(header)}")
        items.append(choice_item(f"{path}: row {n}", subject, n, [cells[i] for i in index], cols, need_answer))
    return items


def choice_item(where: str, subject: str, row: int, cells: list[str], cols: tuple, need_answer: bool) -> ChoiceItem:
    """One question from its cells (question, A, B, C, D, answer letter), checked; `where` starts errors."""
    q, a, b, c, d, ans = cells
    if not q.strip():
        raise EvalDataError(f"{where}: field {cols[0]!r} is empty")
    ans = ans.strip()
    if ans not in LETTERS and not (ans == "" and not need_answer):
        raise EvalDataError(f"{where}: field {cols[5]!r} is {ans!r}, expected one of A, B, C, D")
    return ChoiceItem(subject, row, q, (a, b, c, d), ans or None)


def load_choice_benchmark(benchmark: str, root: str | Path, split: str,
                          subjects: list[str] | None = None) -> dict[str, list[ChoiceItem]]:
    """All subjects (the official list by default) of one split, in the official order."""
    subjects = SUBJECTS[benchmark] if subjects is None else subjects
    need_answer = not (benchmark == "ceval" and split == "test")
    return {s: read_choice_file(benchmark, choice_file(benchmark, root, split, s), s, need_answer)
            for s in subjects}


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = read_json_lines(f, lambda n, _, msg: EvalDataError(f"{path}: line {n}: not valid JSON ({msg})"))
        for n, obj in lines:
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}: line {n}: expected a JSON object")
            out.append((n, obj))
    except (OSError, UnicodeDecodeError) as e:  # a bad gzip stream or bytes
        raise EvalDataError(f"{path}: cannot read ({e})") from None
    return out


def _text_field(where: str, obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        what = "missing" if key not in obj else f"a {type(value).__name__}, expected a string"
        raise EvalDataError(f"{where}: field {key!r} is {what}")
    return value


_GOLD_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # evaluate_gsm8k.py's ANS_RE


def gsm8k_item(where: str, line: int, obj: dict) -> GSM8KItem:
    """One GSM8K question from its `{"question", "answer"}` record, checked; `where` starts errors."""
    q, a = _text_field(where, obj, "question"), _text_field(where, obj, "answer")
    if not _GOLD_RE.search(a):
        raise EvalDataError(f"{where}: field 'answer' has no '#### N' final answer")
    return GSM8KItem(line, q, a)


def read_gsm8k(path: str | Path) -> list[GSM8KItem]:
    path = Path(path)
    return [gsm8k_item(f"{path}: line {n}", n, obj) for n, obj in _read_jsonl(path)]


def humaneval_items(source: str, records) -> list[HumanEvalItem]:
    """HumanEval tasks from `(where, record)` pairs, each field checked and no task_id twice."""
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    items = [HumanEvalItem(*(_text_field(where, obj, k) for k in keys)) for where, obj in records]
    seen = set()
    for item in items:
        if item.task_id in seen:
            raise EvalDataError(f"{source}: task_id {item.task_id!r} appears twice")
        seen.add(item.task_id)
    return items


def read_humaneval(path: str | Path) -> list[HumanEvalItem]:
    path = Path(path)
    return humaneval_items(str(path), [(f"{path}: line {n}", obj) for n, obj in _read_jsonl(path)])
