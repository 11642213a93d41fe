from qwenlm.eval.extract import (base_gsm8k_correct, chat_gsm8k_correct, cut_base_gsm8k, cut_base_humaneval,
                                 extract_chat_code, extract_choice_en, extract_choice_zh, gsm8k_gold, last_number)

CHOICES = ("Paris", "London", "Rome", "Berlin")


def test_english_cascade():
    assert extract_choice_en("The answer is C.", CHOICES) == "C"
    assert extract_choice_en("I would choose B because A is wrong", CHOICES) == "B"  # "choose" beats first letter
    assert extract_choice_en("The answer is not A; D is correct.", CHOICES) == "D"  # negation skipped
    assert extract_choice_en("A and B look close, but B is correct", CHOICES) == "B"
    assert extract_choice_en("D. Berlin", CHOICES) == "D"
    assert extract_choice_en("Options C or A", CHOICES) == "C"  # several letters: the first standalone one
    assert extract_choice_en("It is the capital of Italy: rome.", CHOICES) == "C"  # choice text -> letter
    assert extract_choice_en("I think it is Londn, the English city", CHOICES) == "B"  # fuzzy match
    # nothing to go on: every choice scores 0 and the first one is taken, as the official script does
    assert extract_choice_en("", CHOICES) == "A"


def test_chinese_cascade():
    zh = ("既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付", "保证可靠，但不保证按序交付", "既保证可靠，也保证按序交付")
    q = "关于传输层的面向连接服务的特性是____。"
    assert extract_choice_zh("答案是 B", q, zh) == "B"
    assert extract_choice_zh("答案是B。", q, zh) == "B"
    assert extract_choice_zh("我选择D选项。", q, zh) == "D"
    assert extract_choice_zh("C选项正确", q, zh) == "C"
    # the reply restates the question with the choice's text: read as 答案是D
    assert extract_choice_zh("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", q, zh) == "D"
    assert extract_choice_zh("A", q, zh) == "A"


def test_gsm8k_base_rule():
    assert gsm8k_gold("so 3+4=7\n#### 1,234") == 1234 and gsm8k_gold("#### -5") == -5
    assert cut_base_gsm8k("He has 7 apples.\nThe answer is 7\n\nQuestion: next") == "He has 7 apples.\nThe answer is 7"
    assert base_gsm8k_correct("The answer is 1,234", "#### 1,234") is False  # last \d+ is "234"
    assert base_gsm8k_correct("The answer is 1234.", "#### 1,234")
    assert base_gsm8k_correct("The answer is -5", "#### -5") is False  # base rule drops the sign
    assert base_gsm8k_correct("no number", "#### 5") is False


def test_gsm8k_chat_last_number():
    assert last_number("costs $1,234.50 in total") == "1234.50"
    assert last_number("It drops to -5 degrees") == "-5"
    assert last_number("The answer is 18.") == "18."
    assert last_number("+7 more") == "7"
    assert last_number("nothing here") is None
    gold = "3+4=<<3+4=7>>7\n#### 1,234"
    assert chat_gsm8k_correct("So the total is 1,234.", gold)
    assert chat_gsm8k_correct("So the total is 1234.00001", gold)  # within abs_tol 1e-4
    assert not chat_gsm8k_correct("So the total is 1234.001", gold)
    assert chat_gsm8k_correct("Finally -5", "#### -5") and not chat_gsm8k_correct("Finally 5", "#### -5")
    assert not chat_gsm8k_correct("I cannot tell", gold)


def test_humaneval_cleanup():
    assert cut_base_humaneval("    return a + b\n\n\ndef other():\n    pass") == "    return a + b"
    assert cut_base_humaneval("    x = 1\n\n    return x<|endoftext|>") == "    x = 1"  # official cut at \n\n
    reply = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_chat_code(reply, "add") == "    return a + b"
    assert extract_chat_code("def add(a, b):\n    s = a\n    return s + b\nprint(add(1, 2))", "add") == (
        "    s = a\n    return s + b")
    assert extract_chat_code("def helper(x):\n    return x\n", "add") == "    return x"
    assert extract_chat_code("return a + b", "add") == "    return a + b"
