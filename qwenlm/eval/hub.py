"""Readers of the benchmarks as Hugging Face `datasets` hub datasets (`--data cais/mmlu`), giving the same
items as the official file layouts' readers in `qwenlm.eval.data`, so prompts, scoring and cache keys do not
depend on where the questions came from. Each multiple-choice subject is its own hub config, as each is
its own file; an item's row is its 1-based index in its split, as a file's data row is.

Hub schemas (the datasets' cards; lm-eval's task files name the same datasets and fields):
- cais/mmlu: config per subject; question, subject, choices (4 strings), answer (0-3); splits dev, test.
- ceval/ceval-exam: config per subject; id, question, A, B, C, D, answer, explanation; splits dev, val, test
  (test answers empty).
- haonan-li/cmmlu: config per subject; Question, A, B, C, D, Answer; splits dev, test.
- openai/gsm8k: config "main"; question, answer; split test.
- openai/openai_humaneval: task_id, prompt, canonical_solution, test, entry_point; split test.
UNVERIFIED against the live hub (no network where this was written): that each hub split keeps its
official file's row order, and that haonan-li/cmmlu loads from its parquet export (see `_load`).
"""
from __future__ import annotations

from qwenlm.eval.data import (LETTERS, ChoiceItem, EvalDataError, GSM8KItem, HumanEvalItem, choice_item,
                              gsm8k_item, humaneval_items)
from qwenlm.eval.subjects import SUBJECTS

# benchmark -> (hub name, the short names also accepted: the name without its owner, and older spellings
# that the hub still resolves). Only names that can mean no other benchmark.
HUB_NAMES = {
    "mmlu": ("cais/mmlu", ("mmlu",)),
    "ceval": ("ceval/ceval-exam", ("ceval-exam",)),
    "cmmlu": ("haonan-li/cmmlu", ("cmmlu",)),
    "gsm8k": ("openai/gsm8k", ("gsm8k",)),
    "humaneval": ("openai/openai_humaneval", ("openai_humaneval",)),
}
_COLS = {"ceval": ("question", "A", "B", "C", "D", "answer"), "cmmlu": ("Question", "A", "B", "C", "D", "Answer")}


def hub_name(benchmark: str, name: str) -> str | None:
    """The hub dataset `name` stands for in `benchmark`, or None when it names none."""
    if benchmark not in HUB_NAMES:
        return None
    full, short = HUB_NAMES[benchmark]
    return full if name == full or name in short else None


def accepted_names(benchmark: str) -> str:
    full, short = HUB_NAMES[benchmark]
    return ", ".join((full, *short))


def _load(name: str, config: str | None, split: str):
    """One split through `datasets.load_dataset`, its errors turned into one `EvalDataError`."""
    try:
        import datasets
    except ImportError:
        raise EvalDataError(f"--data {name}: reading a hub dataset needs the `datasets` package "
                            f"(pip install 'qwenlm[eval-hub]'), or pass the official files") from None
    where = f"{name} ({config}, {split})" if config else f"{name} ({split})"
    try:
        try:
            return datasets.load_dataset(name, config, split=split)
        except RuntimeError as e:
            # datasets >= 4 no longer runs loading scripts; the hub's parquet export of such a dataset
            # has the same configs, splits and fields.
            if "scripts are no longer supported" not in str(e):
                raise
            return datasets.load_dataset(name, config, split=split, revision="refs/convert/parquet")
    except ValueError as e:
        if config is not None and f"'{config}' not found" in str(e):
            raise EvalDataError(f"--data {name}: subject {config!r} is not in the hub dataset ({e})") from None
        raise EvalDataError(f"--data {where}: {e}") from None
    except Exception as e:  # no network, an unknown name on the hub, a broken download
        raise EvalDataError(f"--data {where}: cannot read the hub dataset ({type(e).__name__}: {e}); "
                            f"without a network, download the official files and pass their folder or "
                            f"file to --data (docs/eval.md)") from None


def load_choice_benchmark(benchmark: str, name: str, split: str,
                          subjects: list[str] | None = None) -> dict[str, list[ChoiceItem]]:
    """As `data.load_choice_benchmark`, from the hub dataset `name`."""
    subjects = SUBJECTS[benchmark] if subjects is None else subjects
    need_answer = not (benchmark == "ceval" and split == "test")
    out = {}
    for subject in subjects:
        items = []
        for n, rec in enumerate(_load(name, subject, split), start=1):
            where = f"{name} ({subject}, {split}): row {n}"
            if benchmark == "mmlu":
                cells, cols = _mmlu_cells(where, rec), ("question", "A", "B", "C", "D", "answer")
            else:
                cols = _COLS[benchmark]
                cells = [_text(where, rec, c) for c in cols]
            items.append(choice_item(where, subject, n, cells, cols, need_answer))
        out[subject] = items
    return out


def _text(where: str, rec: dict, key: str) -> str:
    if key not in rec:
        raise EvalDataError(f"{where}: field {key!r} is missing")
    return "" if rec[key] is None else str(rec[key])


def _mmlu_cells(where: str, rec: dict) -> list[str]:
    """cais/mmlu's choices list and answer index, as the csv file's four cells and letter."""
    choices, answer = rec.get("choices"), rec.get("answer")
    if not isinstance(choices, list) or len(choices) != 4:
        raise EvalDataError(f"{where}: field 'choices' is {choices!r}, expected 4 strings")
    if not isinstance(answer, int) or not 0 <= answer < 4:
        raise EvalDataError(f"{where}: field 'answer' is {answer!r}, expected 0, 1, 2 or 3")
    return [_text(where, rec, "question"), *map(str, choices), LETTERS[answer]]


def read_gsm8k(name: str) -> list[GSM8KItem]:
    """GSM8K's test split from the hub (config "main"), as `data.read_gsm8k` reads test.jsonl."""
    return [gsm8k_item(f"{name} (main, test): row {n}", n, rec)
            for n, rec in enumerate(_load(name, "main", "test"), start=1)]


def read_humaneval(name: str) -> list[HumanEvalItem]:
    """HumanEval's test split from the hub, as `data.read_humaneval` reads HumanEval.jsonl."""
    return humaneval_items(name, [(f"{name} (test): row {n}", rec)
                                  for n, rec in enumerate(_load(name, None, "test"), start=1)])
