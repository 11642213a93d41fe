"""Benchmark files in the official layouts, with known answers, written by the tests."""
import csv
import gzip
import json
from pathlib import Path

MMLU_ROWS = {  # subject -> (dev rows, test rows); question, A, B, C, D, answer
    "abstract_algebra": (
        [[f"dev q{i}, with a comma", "1", "2", "3", "4", "ABCDA"[i]] for i in range(5)] + [["unused", "a", "b", "c", "d", "A"]],
        [["What is 2+2?", "3", "4", "5", "6", "B"], ["Zero?", "0", "1", "2", "3", "A"],
         ["Line\nbreak?", "x", "y", "z", "w", "D"], ["Three?", "1", "2", "3", "4", "C"]]),
    "sociology": (
        [[f"s{i}", "p", "q", "r", "s", "A"] for i in range(5)],
        [["Who?", "Weber", "Marx", "Durkheim", "Comte", "A"], ["When?", "1900", "1800", "1700", "1600", "A"]]),
}
CEVAL_ROWS = {
    "computer_network": ([[str(i), f"问{i}", "甲", "乙", "丙", "丁", "ABCDA"[i], "解析"] for i in range(5)],
                         [["0", "哪个是对的？", "甲", "乙", "丙", "丁", "C"], ["1", "第二题", "一", "二", "三", "四", "A"]]),
    "advanced_mathematics": ([[str(i), f"数{i}", "1", "2", "3", "4", "B", ""] for i in range(5)],
                             [["0", "1+1=？", "1", "2", "3", "4", "B"]]),
}
CMMLU_ROWS = {
    "agronomy": ([[str(i), f"农{i}", "a", "b", "c", "d", "D"] for i in range(5)],
                 [["0", "问题一", "a", "b", "c", "d", "D"], ["1", "问题二", "a", "b", "c", "d", "A"],
                  ["2", "问题三", "a", "b", "c", "d", "A"]]),
}


def _write_csv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_mmlu(root: Path) -> Path:
    for subject, (dev, test) in MMLU_ROWS.items():
        _write_csv(root / "dev" / f"{subject}_dev.csv", dev)
        _write_csv(root / "test" / f"{subject}_test.csv", test)
    return root


def write_ceval(root: Path) -> Path:
    for subject, (dev, val) in CEVAL_ROWS.items():
        _write_csv(root / "dev" / f"{subject}_dev.csv", dev, ["id", "question", "A", "B", "C", "D", "answer",
                                                               "explanation"])
        _write_csv(root / "val" / f"{subject}_val.csv", val, ["id", "question", "A", "B", "C", "D", "answer"])
    return root


def write_cmmlu(root: Path) -> Path:
    for subject, (dev, test) in CMMLU_ROWS.items():
        for split, rows in (("dev", dev), ("test", test)):
            _write_csv(root / split / f"{subject}.csv", rows, ["", "Question", "A", "B", "C", "D", "Answer"])
    return root


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A debt of 1,200 grows by 34. Total?", "answer": "1200+34=1234\n#### 1,234"},
    {"question": "Temperature drops from 2 by 7?", "answer": "2-7=-5\n#### -5"},
]

HUMANEVAL_TASKS = [
    {"task_id": "HumanEval/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "entry_point": "double",
     "prompt": "def double(x):\n    '''Twice x.\n    '''\n",
     "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
