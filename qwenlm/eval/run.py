"""The `qwenlm eval` driver: read a benchmark, run the model on the items not yet in the cache, score them
as the official scripts do, and write the totals.

Base models: multiple choice by the next letter token (few-shot, one prefill per item through the engine, the
subject's shared few-shot prefix computed once and served from the prefix cache); GSM8K and
HumanEval by greedy completion, cut by the official rules. Chat models (--chat): each question 0-shot as a
`model.chat` query (ChatML, default system prompt, greedy, no repetition penalty), batched through the
engine, and the official extraction on the reply. HumanEval programs run in the sandbox.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from qwenlm.eval import data, extract, hub, prompts
from qwenlm.eval import plugin
from qwenlm.eval.batching import batches, greedy_generation
from qwenlm.eval.cache import ItemCache
from qwenlm.eval.choice import letter_ids, pick_letter
from qwenlm.eval.engine_logprobs import engine_next_token_logprobs
from qwenlm.eval.results import accuracy, markdown_table, summarize_choice
from qwenlm.eval.sandbox import run_humaneval
from qwenlm.eval.subjects import SUBJECTS
from qwenlm.files import write_text

BENCHMARKS = ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "plugin")
CHOICE = ("mmlu", "ceval", "cmmlu")
# The split scored: C-Eval's test answers are not published, so its val split (as the chat figures are).
SPLIT = {"mmlu": "test", "ceval": "val", "cmmlu": "test"}


def check_args(args) -> None:
    """Everything that can be wrong before a model loads: one clear error naming the option."""
    if args.benchmark == "plugin":
        return plugin.check_args(args)
    if not Path(args.data).exists():
        if hub.hub_name(args.benchmark, args.data) is None:
            raise FileNotFoundError(f"--data {args.data}: no such file or folder, nor a `datasets` hub name of "
                                    f"{args.benchmark} (accepted: {hub.accepted_names(args.benchmark)})")
    elif args.benchmark in CHOICE and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: {args.benchmark} needs the folder holding dev/ and "
                         f"{SPLIT[args.benchmark]}/ (see docs/eval.md)")
    elif args.benchmark not in CHOICE and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: {args.benchmark} needs a .jsonl file")
    if args.chat and args.shots not in (None, 0):
        raise ValueError("--shots: chat models are evaluated 0-shot, as the published figures are")
    if args.shots is not None and args.shots < -1:
        raise ValueError(f"--shots must be -1 (the whole dev split), 0 or more, got {args.shots}")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.subjects is not None:
        if args.benchmark not in CHOICE:
            raise ValueError(f"--subjects: {args.benchmark} has no subjects")
        unknown = [s for s in _subjects(args) if s not in SUBJECTS[args.benchmark]]
        if unknown:
            raise ValueError(f"--subjects: {unknown[0]!r} is not a {args.benchmark} subject")
    if args.benchmark == "gsm8k" and not args.chat:
        if args.fewshot_prompt is None:
            raise ValueError("--fewshot-prompt FILE: base-model GSM8K needs the 8-shot prompt file "
                             "(the official gsm8k_prompt.txt)")
        if not Path(args.fewshot_prompt).is_file():
            raise FileNotFoundError(f"--fewshot-prompt {args.fewshot_prompt}: no such file")


def _subjects(args) -> list[str]:
    if args.subjects is None:
        return list(SUBJECTS[args.benchmark])
    return [s.strip() for s in args.subjects.split(",") if s.strip()]


def load_items(args) -> tuple[list[tuple[str, object]], dict]:
    """[(key, item)] in the official order (--limit: the first N of each subject, or of the file), and the
    dev split per subject for the few-shot prefixes."""
    name = None if Path(args.data).exists() else hub.hub_name(args.benchmark, args.data)
    source, where = (data, args.data) if name is None else (hub, name)  # same readers, same items
    if args.benchmark in CHOICE:
        subjects = _subjects(args)
        test = source.load_choice_benchmark(args.benchmark, where, SPLIT[args.benchmark], subjects)
        dev = {} if args.chat else source.load_choice_benchmark(args.benchmark, where, "dev", subjects)
        items = [(f"{s}/{it.row}", it) for s in subjects for it in test[s][:args.limit]]
        return items, dev
    if args.benchmark == "gsm8k":
        items = [(str(it.line), it) for it in source.read_gsm8k(where)]
    else:
        items = [(it.task_id, it) for it in source.read_humaneval(where)]
    return items[:args.limit], {}



def _score_base_choice(llm, args, todo, dev, cache, bar) -> None:
    bench, shots = args.benchmark, prompts.N_SHOT if args.shots is None else args.shots
    ids = letter_ids(llm.tokenizer, bench)
    backend = engine_next_token_logprobs(llm.engine, llm.tokenizer)
    by_subject: dict[str, list] = {}
    for key, item in todo:
        by_subject.setdefault(item.subject, []).append((key, item))
    for subject, pending in by_subject.items():
        prefix = prompts.few_shot_prefix(bench, subject, dev[subject], shots)
        for chunk in batches(pending, args.batch_size):
            rows = backend([prompts.base_choice_prompt(bench, prefix, it) for _, it in chunk], ids)
            records = []
            for (key, item), lps in zip(chunk, rows):
                pred, probs = pick_letter(list(lps))
                records.append(dict(key=key, subject=subject, row=item.row, answer=item.answer, pred=pred,
                                    probs=list(probs), correct=pred == item.answer))
            cache.add(records)
            bar.update(len(chunk))


def _chat_or_complete(llm, args, texts: list[str], **extra) -> list[str]:
    if args.chat:
        return llm.generate(texts, chat_format="chatml", **greedy_generation(args))
    return llm.generate(texts, **greedy_generation(args, **extra))


def _score_generated(llm, args, todo, cache, bar, fewshot: str) -> None:
    bench = args.benchmark
    for chunk in batches(todo, args.batch_size):
        items = [it for _, it in chunk]
        if bench in CHOICE:
            replies = _chat_or_complete(llm, args, [prompts.chat_choice_question(bench, it) for it in items])
            records = []
            for (key, it), reply in zip(chunk, replies):
                pred = (extract.extract_choice_en(reply, it.choices) if bench == "mmlu"
                        else extract.extract_choice_zh(reply, it.question, it.choices))
                records.append(dict(key=key, subject=it.subject, row=it.row, answer=it.answer, reply=reply,
                                    pred=pred, correct=pred == it.answer))
        elif bench == "gsm8k":
            if args.chat:
                replies = _chat_or_complete(llm, args, [prompts.gsm8k_chat_question(it) for it in items])
                correct = [extract.chat_gsm8k_correct(r, it.answer) for r, it in zip(replies, items)]
            else:  # stopping at the first cut point leaves the same text as generating on and cutting
                raw = _chat_or_complete(llm, args, [prompts.gsm8k_base_prompt(fewshot, it) for it in items],
                                        stop=["\n\n", "Question:"])
                replies = [extract.cut_base_gsm8k(r) for r in raw]
                correct = [extract.base_gsm8k_correct(r, it.answer) for r, it in zip(replies, items)]
            records = [dict(key=key, reply=r, correct=c) for (key, _), r, c in zip(chunk, replies, correct)]
        else:
            if args.chat:
                replies = _chat_or_complete(llm, args, [prompts.humaneval_chat_question(it) for it in items])
                completions = [extract.extract_chat_code(r, it.entry_point) for r, it in zip(replies, items)]
            else:
                replies = _chat_or_complete(llm, args, [prompts.humaneval_base_prompt(it) for it in items],
                                            stop=["\n\n", "def "])
                completions = [extract.cut_base_humaneval(r) for r in replies]
            results = run_humaneval(items, {it.task_id: c for it, c in zip(items, completions)})
            records = [dict(key=key, reply=r, completion=res.completion, status=res.status, detail=res.detail,
                            correct=res.correct) for (key, _), r, res in zip(chunk, replies, results)]
        cache.add(records)
        bar.update(len(chunk))


def task_name(args) -> str:
    return f"{args.benchmark}-{'chat' if args.chat else 'base'}"


def settings(args) -> dict:
    """What decides the items' results: a cache made with other values is not reused."""
    model = os.path.abspath(args.model) if Path(args.model).is_dir() else args.model
    return dict(benchmark=args.benchmark, chat=args.chat, model=model,
                shots=None if args.chat or args.benchmark not in CHOICE else
                (prompts.N_SHOT if args.shots is None else args.shots),
                max_new_tokens=args.max_new_tokens,
                fewshot_prompt=args.fewshot_prompt and os.path.abspath(args.fewshot_prompt))


def run(args, load_model) -> dict:
    """Score the benchmark (loading the model through `load_model()` only when an item is left to do),
    write `summary.json` and `summary.md` under `<out>/<task>/`, and return the summary."""
    if args.benchmark == "plugin":  # the tool-use benchmark: generated ReAct replies, its own scores
        return plugin.run(args, load_model)
    check_args(args)
    items, dev = load_items(args)
    fewshot = Path(args.fewshot_prompt).read_text(encoding="utf-8") if args.fewshot_prompt else ""
    folder = Path(args.out) / task_name(args)
    cache = ItemCache(folder, settings(args))
    todo = [(k, it) for k, it in items if k not in cache.done]
    llm = load_model() if todo else None
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=task_name(args), unit="item") as bar:
        if todo:
            try:
                if args.benchmark in CHOICE and not args.chat:
                    _score_base_choice(llm, args, todo, dev, cache, bar)
                else:
                    _score_generated(llm, args, todo, cache, bar, fewshot)
            except KeyboardInterrupt:
                bar.close()
                raise KeyboardInterrupt(f"{len(cache.done)} items kept in {cache.path}; "
                                        f"run the same command again to go on") from None
    return write_summary(args, folder, [cache.done[k] for k, _ in items])


def write_summary(args, folder: Path, records: list[dict]) -> dict:
    """Totals over this run's items, recomputed from the cached lines."""
    rows = [SimpleNamespace(subject=r.get("subject"), correct=bool(r["correct"])) for r in records]
    s = summarize_choice(args.benchmark, rows) if args.benchmark in CHOICE else accuracy(rows)
    official = "Qwen-7B-Chat" if args.chat else "Qwen-7B"
    summary = dict(benchmark=args.benchmark, chat=args.chat, count=s.count, overall=s.overall,
                   by_category=s.by_category, by_subject=s.by_subject, official_model=official,
                   metric="pass@1" if args.benchmark == "humaneval" else "accuracy")
    table = markdown_table({args.benchmark: s.overall}, official)
    if s.by_category:
        table += "\n| category | measured |\n| --- | ---: |\n" + "".join(
            f"| {c} | {v:.1f} |\n" for c, v in s.by_category.items())
    write_text(folder / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_text(folder / "summary.md", f"# {args.benchmark} ({'chat' if args.chat else 'base'}), "
                                      f"{s.count} items\n\n{table}")
    print(table, end="")
    return summary
