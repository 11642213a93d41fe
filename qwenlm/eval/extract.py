"""Answer extraction from generated text, rule for rule as the official Qwen `eval/` scripts do it.

- `extract_choice_en`: evaluate_chat_mmlu.py (choice texts replaced by letters, a regex cascade, then a
  fuzzy match of the whole reply against the choice texts with `thefuzz.process.extractOne`).
- `extract_choice_zh`: evaluate_chat_ceval.py (the question's wording removed first, Chinese patterns).
- GSM8K: evaluate_gsm8k.py (base: last run of digits == the `#### N` answer) and evaluate_chat_gsm8k.py
  (chat: last signed/decimal/comma-grouped number of both texts, `math.isclose(abs_tol=1e-4)`).
- HumanEval: evaluate_humaneval.py's completion cut, evaluate_chat_humaneval.py's code extraction.

The fuzzy fallback always names a letter: a reply with nothing to match (empty, or only punctuation)
scores 0 against every choice and gets "A", as in the official scripts.
"""
from __future__ import annotations

import math
import re
import textwrap

from qwenlm.eval.data import LETTERS

# --- multiple choice, English (evaluate_chat_mmlu.py) ---------------------------------------------------
_EN_CASCADE = (
    # "answer is A", "choice: A", "choose A" -- unless "not" / "n't" comes between
    re.compile(r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?"
               r"\b(?:|is|:|be))\b)[^ABCD]{0,20}?\b(A|B|C|D)\b"),
    # "A is correct", "A is right" -- unless negated
    re.compile(r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?"
               r"\b(?:correct|right)\b"),
    re.compile(r"^(A|B|C|D)(?:\.|,|:|$)"),  # the reply starts with the letter
    re.compile(r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])"),  # the first standalone letter
)

# --- multiple choice, Chinese (evaluate_chat_ceval.py) --------------------------------------------------
_ZH_CASCADE = (
    # 答案是A | 选项是A | 应该选A选项 -- unless 不/非 comes between
    re.compile(r"(?:(?:选|选择|选定)|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|为|：|:|】))"
               r"[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$)"),
    # A选项正确 | A选项符合题意 -- unless negated
    re.compile(r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对|符合))[^ABCD]{0,4}?"
               r"(?:正确|对|符合)"),
    re.compile(r"^(A|B|C|D)(?:。|\.|，|,|．|$)"),
    re.compile(r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])"),
)


def _fuzzy_letter(reply: str, choices: tuple[str, ...]) -> str:
    from thefuzz import process  # what the official scripts use; WRatio with its default processor
    best = process.extractOne(reply, list(choices))[0]
    return LETTERS[list(choices).index(best)]


def _cascade(text: str, patterns) -> str | None:
    for pattern in patterns:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def _longest_first(choices: tuple[str, ...]):
    # sorted() is stable: equal lengths keep A..D order, as the official dict sort does
    return sorted(zip(LETTERS, choices), key=lambda kv: len(kv[1]), reverse=True)


def extract_choice_en(reply: str, choices: tuple[str, ...]) -> str:
    """The letter a chat model's reply to an MMLU question names."""
    text = reply
    for letter, choice in _longest_first(choices):
        text = re.sub(re.escape(choice.rstrip(".")), letter, text, flags=re.IGNORECASE)
    return _cascade(text, _EN_CASCADE) or _fuzzy_letter(text, choices)


def extract_choice_zh(reply: str, question: str, choices: tuple[str, ...]) -> str:
    """The letter a chat model's reply to a C-Eval question names."""
    text = reply
    # A reply that restates the question ("关于...的特性是既保证...") reads as "答案是<choice>":
    # the last sentence's part before the blank becomes 答案是, the part after it goes.
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        text = text.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        text = text.replace(parts[-1], "")
    for letter, choice in _longest_first(choices):
        text = text.replace(choice.rstrip("。"), letter)
    return _cascade(text, _ZH_CASCADE) or _fuzzy_letter(text, choices)


# --- GSM8K ----------------------------------------------------------------------------------------------
_GOLD_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CHAT_NUMBER_RE = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")


def _python_number(text: str) -> int | float | None:
    """The value Python's eval() gives a plain numeric literal (what the scripts call), else None.
    Integers with leading zeros ("007") are a SyntaxError there, so None here."""
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text)
    if re.fullmatch(r"\d+", body):
        return None if len(body) > 1 and body[0] == "0" and body.strip("0") else sign * int(body)
    if re.fullmatch(r"\d+\.\d*|\.\d+", body):
        return sign * float(body)
    return None


def gsm8k_gold(answer: str) -> int | float:
    """The `#### N` final answer of a GSM8K solution (commas dropped)."""
    m = _GOLD_RE.search(answer)
    value = None if m is None else _python_number(m.group(1).strip().replace(",", ""))
    if value is None:
        raise ValueError(f"no '#### N' final answer in {answer[-80:]!r}")
    return value


def cut_base_gsm8k(completion: str) -> str:
    """evaluate_gsm8k.py: a base model's continuation ends at the first of these."""
    for stop in ("<|endoftext|>", "\n\n\n", "\n\n", "Question:"):
        completion = completion.split(stop)[0]
    return completion


def base_gsm8k_correct(completion: str, answer: str) -> bool:
    """evaluate_gsm8k.py: the last run of digits (no sign, no decimals) equals the gold answer."""
    runs = re.findall(r"\d+", completion)
    pred = _python_number(runs[-1]) if runs else None
    return pred is not None and pred == gsm8k_gold(answer)


def last_number(text: str) -> str | None:
    """evaluate_chat_gsm8k.py: the last number (sign, thousands commas, decimals) as text, commas and '+' dropped."""
    matches = list(_CHAT_NUMBER_RE.finditer(text))
    return matches[-1].group().replace(",", "").replace("+", "").strip() if matches else None


def chat_gsm8k_correct(reply: str, answer: str) -> bool:
    """evaluate_chat_gsm8k.py: the reply's last number is within 1e-4 of the gold text's last number."""
    gold, pred = last_number(answer), last_number(reply)
    if gold is None:
        raise ValueError(f"no number in the gold answer {answer[-80:]!r}")
    g, p = _python_number(gold), None if pred is None else _python_number(pred)
    return g is not None and p is not None and math.isclose(g, p, rel_tol=0, abs_tol=1e-4)


# --- HumanEval ------------------------------------------------------------------------------------------
def cut_base_humaneval(completion: str) -> str:
    """evaluate_humaneval.py: the continuation of the raw prompt ends at the first of these (the blank-line
    cut also drops any part of a body after a blank line; inherited from the official script)."""
    for stop in ("<|endoftext|>", "\n\n\n", "\n\n", "def "):
        completion = completion.split(stop)[0]
    return completion


def extract_chat_code(reply: str, entry_point: str) -> str:
    """evaluate_chat_humaneval.py: the body of `def entry_point` inside a fenced block, else of
    `def entry_point` anywhere, else of any def, else the whole reply indented by 4 spaces."""
    name = re.escape(entry_point)
    for pattern in (rf"```(?:[Pp]ython\n)?.*?def\s+{name}.*?:\n(.*?)\n```",
                    rf"def\s+{name}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
                    r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)"):
        m = re.search(pattern, reply, re.DOTALL)
        if m:
            return m.group(1)
    return textwrap.indent(reply, " " * 4)
