import pytest

from eval_fixtures import (GSM8K_ROWS, HUMANEVAL_TASKS, write_ceval, write_cmmlu, write_jsonl, write_mmlu)
from qwenlm.eval.data import (EvalDataError, load_choice_benchmark, read_choice_file, read_gsm8k,
                              read_humaneval)
from qwenlm.eval.prompts import (base_choice_prompt, chat_choice_question, few_shot_prefix, gsm8k_base_prompt,
                                 humaneval_chat_question)


def test_mmlu_layout_and_official_prompt(tmp_path):
    root = write_mmlu(tmp_path / "mmlu")
    test = load_choice_benchmark("mmlu", root, "test", ["abstract_algebra", "sociology"])
    dev = load_choice_benchmark("mmlu", root, "dev", ["abstract_algebra"])["abstract_algebra"]
    item = test["abstract_algebra"][0]
    assert (item.row, item.question, item.choices, item.answer) == (1, "What is 2+2?", ("3", "4", "5", "6"), "B")
    assert test["abstract_algebra"][2].question == "Line\nbreak?"  # quoted csv cell kept whole
    prefix = few_shot_prefix("mmlu", "abstract_algebra", dev)
    assert prefix.startswith("The following are multiple choice questions (with answers) about abstract algebra."
                             "\n\nQuestion: dev q0, with a comma\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n")
    assert prefix.count("Question: ") == 5 and "unused" not in prefix  # the first five dev rows only
    prompt = base_choice_prompt("mmlu", prefix, item)
    assert prompt.endswith("Answer: A\n\nQuestion: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert chat_choice_question("mmlu", item) == (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
        "as the answer to this question.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\n")


def test_ceval_and_cmmlu_layouts_and_chinese_prompts(tmp_path):
    croot = write_ceval(tmp_path / "ceval")
    val = load_choice_benchmark("ceval", croot, "val", ["computer_network"])["computer_network"]
    dev = load_choice_benchmark("ceval", croot, "dev", ["computer_network"])["computer_network"]
    prefix = few_shot_prefix("ceval", "computer_network", dev)
    assert prefix.startswith("问题：问0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n问题：问1")
    assert base_choice_prompt("ceval", prefix, val[0]).endswith("答案：A\n\n问题：哪个是对的？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert chat_choice_question("ceval", val[0]) == "哪个是对的？\n\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n"
    mroot = write_cmmlu(tmp_path / "cmmlu")
    test = load_choice_benchmark("cmmlu", mroot, "test", ["agronomy"])["agronomy"]
    assert [(i.question, i.answer) for i in test] == [("问题一", "D"), ("问题二", "A"), ("问题三", "A")]


def test_choice_file_errors_name_file_row_and_field(tmp_path):
    root = write_mmlu(tmp_path / "mmlu")
    bad = root / "test" / "abstract_algebra_test.csv"
    bad.write_text('"q",1,2,3,4,B\n"q2",1,2,3,4,E\n')
    with pytest.raises(EvalDataError, match=r"abstract_algebra_test\.csv: row 2: field 'answer' is 'E'"):
        read_choice_file("mmlu", bad, "abstract_algebra")
    bad.write_text('"q",1,2,3,B\n')
    with pytest.raises(EvalDataError, match=r"row 1: 5 columns, expected 6"):
        read_choice_file("mmlu", bad, "abstract_algebra")
    cbad = tmp_path / "x_val.csv"
    cbad.write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n")
    with pytest.raises(EvalDataError, match=r"x_val\.csv: header .* lacks column 'D'"):
        read_choice_file("ceval", cbad, "x")
    with pytest.raises(EvalDataError, match=r"virology_test\.csv: file not found"):
        load_choice_benchmark("mmlu", root, "test", ["virology"])


def test_gsm8k_and_humaneval_readers(tmp_path):
    items = read_gsm8k(write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS))
    assert [i.line for i in items] == [1, 2, 3] and items[1].answer.endswith("#### 1,234")
    assert gsm8k_base_prompt("FEWSHOT\n", items[0]) == (
        "FEWSHOT\n\nQuestion: Tom has 3 apples and buys 4. How many?\nLet's think step by step\n")
    for gz in (False, True):
        name = "HumanEval.jsonl.gz" if gz else "HumanEval.jsonl"
        tasks = read_humaneval(write_jsonl(tmp_path / name, HUMANEVAL_TASKS, gz=gz))
        assert [t.entry_point for t in tasks] == ["add", "double"]
    assert humaneval_chat_question(tasks[0]) == (
        "Write a Python function `add(a: int, b: int) -> int` to solve the following problem:\n"
        "Add two numbers.\n>>> add(1, 2)\n3\n\n" + tasks[0].prompt)
    bad = tmp_path / "bad.jsonl"
    for text, error, reader in [
            ('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n',
             r"bad\.jsonl: line 2: field 'answer' is missing", read_gsm8k),
            ('{"question": "q", "answer": "no final"}\n', r"line 1: field 'answer' has no '#### N'", read_gsm8k),
            ("{not json\n", r"bad\.jsonl: line 1: not valid JSON", read_humaneval),
            ('{"task_id": "t", "prompt": "p", "canonical_solution": "", "test": 3, "entry_point": "f"}\n',
             r"line 1: field 'test' is a int", read_humaneval)]:
        bad.write_text(text)
        with pytest.raises(EvalDataError, match=error):
            reader(bad)
