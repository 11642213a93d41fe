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


# The tool-use benchmark (exam_plugin_v20231206_react_{positive,negative}.jsonl): each prompt is the whole user
# message, the ReAct instruction with the tools and then the question; each response the reference reply.
PLUGIN_TOOLS = [
    {"name": "get_weather", "description": "Get the weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name_for_model": "search", "name_for_human": "Web Search", "description_for_model": "Search the web.",
     "parameters": [{"name": "query", "description": "keywords", "required": True, "schema": {"type": "string"}}]},
    {"name": "calculator", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}},
]


def _react_prompt(question: str) -> str:
    from qwenlm.tools import build_react_instruction
    return f"{build_react_instruction(PLUGIN_TOOLS)}\n\nQuestion: {question}"


def _call(thought, action, action_input, observation, answer):
    return (f"Thought: {thought}\nAction: {action}\nAction Input: {action_input}\nObservation: {observation}\n"
            f"Thought: I now know the final answer\nFinal Answer: {answer}")


PLUGIN_POSITIVE = [  # (question, tool, reference reply)
    ("What is the weather in Paris?", "get_weather",
     _call("I need the weather.", "get_weather", '{"city": "Paris"}', "sunny", "It is sunny in Paris.")),
    ("Is it raining in Berlin?", "get_weather",
     _call("Look it up.", "get_weather", '{"city": "Berlin"}', "rain", "Yes.")),
    ("Who made Qwen?", "search",
     _call("Search the web.", "search", '{"query": "qwen"}', "Alibaba Cloud", "Alibaba Cloud.")),
    ("What is 2+2?", "calculator",
     _call("Compute it.", "calculator", '{"expression": "2+2"}', "4", "4")),
    ("How warm is Rome?", "get_weather",  # written with single quotes: json5 reads it
     _call("Weather again.", "get_weather", "{'city': 'Rome'}", "20 C", "20 C.")),
]
PLUGIN_NEGATIVE = [  # (question, reference reply): no tool fits
    ("Hello, who are you?", "Thought: No tool is needed.\nFinal Answer: I am a helpful assistant."),
    ("Write a haiku about spring.", "Thought: I can write it myself.\nFinal Answer: Blossoms drift..."),
    ("Translate 'cat' into French.", "Thought: I know this.\nFinal Answer: chat"),
]


def write_plugin(root: Path) -> Path:
    write_jsonl(root / "exam_plugin_v20231206_react_positive.jsonl",
                [{"prompt": _react_prompt(q), "response": r} for q, _, r in PLUGIN_POSITIVE])
    write_jsonl(root / "exam_plugin_v20231206_react_negative.jsonl",
                [{"prompt": _react_prompt(q), "response": r} for q, r in PLUGIN_NEGATIVE])
    return root
