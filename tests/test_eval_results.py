import pytest

from qwenlm.eval.choice import ChoiceRecord
from qwenlm.eval.results import markdown_table, summarize_choice


def _records(subject, n_right, n_wrong):
    return ([ChoiceRecord(subject, i, "A", "A", ()) for i in range(n_right)]
            + [ChoiceRecord(subject, i, "A", "B", ()) for i in range(n_wrong)])


def test_mmlu_is_micro_and_ceval_is_macro():
    recs = _records("abstract_algebra", 3, 1) + _records("sociology", 0, 4)  # 3/4 and 0/4
    recs += _records("anatomy", 2, 0)
    mmlu = summarize_choice("mmlu", recs)
    assert mmlu.overall == pytest.approx(100 * 5 / 10)
    assert mmlu.by_category == pytest.approx({"stem": 100 * 5 / 6, "social": 0.0})
    ceval = summarize_choice("ceval", _records("computer_network", 1, 0) + _records("advanced_mathematics", 1, 3))
    assert ceval.overall == pytest.approx((100 + 25) / 2)
    assert ceval.by_category["STEM"] == pytest.approx(62.5) and ceval.by_category["Hard"] == pytest.approx(25.0)
    cmmlu = summarize_choice("cmmlu", _records("agronomy", 1, 1) + _records("ancient_chinese", 1, 0))
    assert cmmlu.by_category["China specific"] == 100.0 and cmmlu.overall == pytest.approx(75.0)


def test_markdown_table_puts_official_figures_beside():
    table = markdown_table({"mmlu": 54.0, "gsm8k": 51.0, "cmmlu": 60.0})
    lines = table.splitlines()
    assert lines[0] == "| benchmark | measured | official (Qwen-7B-Chat) | difference |"
    assert lines[2] == "| MMLU | 54.0 | 55.8 | -1.8 |"
    assert lines[3] == "| GSM8K | 51.0 | 50.3 | +0.7 |"
    assert lines[4] == "| CMMLU | 60.0 | - | - |"
    assert "| HumanEval | 30.0 | 29.9 | +0.1 |" in markdown_table({"humaneval": 30.0}, model="Qwen-7B")
