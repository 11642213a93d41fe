"""Prompt text exactly as the official Qwen `eval/` scripts build it (spec §17).

Base models see few-shot prompts and are scored on the next token; chat models see a 0-shot question
through the chat template (`model.chat`, greedy) and are scored on their reply.
"""
from __future__ import annotations

import re

from qwenlm.eval.data import LETTERS, ChoiceItem, GSM8KItem, HumanEvalItem

N_SHOT = 5  # evaluate_{mmlu,ceval,cmmlu}.py: k=5, the first five rows of the dev split

_MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
# evaluate_chat_mmlu.py's instruction, kept word for word.
_CHAT_MMLU_INSTRUCTION = ("The following is a multiple-choice question. Please choose the most suitable one "
                          "among A, B, C and D as the answer to this question.\n\n")


def _options(item: ChoiceItem) -> str:
    return "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, item.choices))


def _mmlu_example(item: ChoiceItem, with_answer: bool) -> str:
    tail = f"\nAnswer: {item.answer}\n\n" if with_answer else "\nAnswer:"
    return "Question: " + item.question + _options(item) + tail


def _chinese_example(item: ChoiceItem, with_answer: bool) -> str:
    # evaluate_ceval.py and evaluate_cmmlu.py share this form; the full-width colon is theirs.
    tail = f"\n答案：{item.answer}\n\n" if with_answer else "\n答案："
    return "问题：" + item.question + _options(item) + tail


def few_shot_prefix(benchmark: str, subject: str, dev: list[ChoiceItem], k: int = N_SHOT) -> str:
    """The part shared by every test question of a subject (k=-1: the whole dev split, as officially)."""
    shots = dev if k == -1 else dev[:k]
    if benchmark == "mmlu":
        # format_subject: underscores become spaces
        return _MMLU_HEADER.format(" ".join(subject.split("_")).strip()) + "".join(
            _mmlu_example(s, True) for s in shots)
    if benchmark in ("ceval", "cmmlu"):
        return "".join(_chinese_example(s, True) for s in shots)  # no header in either script
    raise ValueError(f"unknown benchmark {benchmark!r}")


def base_choice_prompt(benchmark: str, prefix: str, item: ChoiceItem) -> str:
    """Few-shot prefix + the test question, ending where the answer letter goes."""
    example = _mmlu_example if benchmark == "mmlu" else _chinese_example
    return prefix + example(item, False)


def chat_choice_question(benchmark: str, item: ChoiceItem) -> str:
    """The 0-shot user message of evaluate_chat_mmlu.py / evaluate_chat_ceval.py.

    There is no official chat script for CMMLU; the C-Eval form is used for it (not official)."""
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, item.choices))
    if benchmark == "mmlu":
        return _CHAT_MMLU_INSTRUCTION + item.question + "\n" + options
    if benchmark in ("ceval", "cmmlu"):
        return item.question + "\n\n" + options
    raise ValueError(f"unknown benchmark {benchmark!r}")


def gsm8k_base_prompt(fewshot_prompt: str, item: GSM8KItem) -> str:
    """evaluate_gsm8k.py: the 8-shot `gsm8k_prompt.txt` (its content, read by the caller) + the question."""
    return fewshot_prompt + "\nQuestion: " + item.question + "\nLet's think step by step\n"


def gsm8k_chat_question(item: GSM8KItem) -> str:
    """evaluate_chat_gsm8k.py without --use-fewshot (the setting of the published 0-shot figure)."""
    return item.question


def humaneval_base_prompt(item: HumanEvalItem) -> str:
    return item.prompt  # evaluate_humaneval.py completes the raw prompt


def humaneval_chat_question(item: HumanEvalItem) -> str:
    """evaluate_chat_humaneval.py's HumanEvalPack-style message: the signature, the docstring with each
    line stripped, then the original prompt."""
    sig = re.search(rf"def\s+({re.escape(item.entry_point)}.*?):\s*\n", item.prompt)
    doc = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", item.prompt, re.DOTALL)
    if sig is None or doc is None:
        what = "a 'def {}(...):' line".format(item.entry_point) if sig is None else "a docstring"
        raise ValueError(f"HumanEval task {item.task_id}: prompt has no {what}")
    description = "\n".join(line.strip() for line in doc.group(1).split("\n"))
    return (f"Write a Python function `{sig.group(1)}` to solve the following problem:\n"
            f"{description}\n{item.prompt}")
