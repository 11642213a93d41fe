"""The tool-use ("plugin") benchmark of the official `evaluate_plugin.py` (spec §17): Qwen's ReAct replies
to the `exam_plugin_v20231206_react_{positive,negative}.jsonl` prompts, scored as that script does.

Files: jsonl, one `{"prompt", "response"}` object a line. `prompt` is the whole user message (the ReAct
instruction with the tools, then "Question: ..."), sent 0-shot through the chat template with the default
system prompt (the script calls `model.chat(tokenizer, prompt, history=None)`), greedy. `response` is the
reference reply. Scores:
- positive set: tool selection accuracy ("action_right_rate": the reply contains "\\nAction: " and names the
  reference's tool, compared stripped and case-insensitively) and the Rouge-L F of the Action Input
  ("action_input_rouge": both inputs read with json5 and re-written by `json.dumps(sort_keys=True,
  ensure_ascii=False)` — "" when unreadable — then cut into Qwen tokens joined by spaces and split on
  whitespace, as the script's `_get_tokenized_string` + `_DummyTokenizer` do), averaged over the items;
- negative set: the false-positive rate ("bad_rate": replies containing "\\nAction: ").

Generation stops at "Observation:" (the script generates on to <|im_end|>, but reads the Action and its input
only up to the first "Observation:"). The Action / Action Input are read by `qwenlm.tools.parse_react_reply`,
the server's parser; the script's own `process_res` finds "Action:" without its leading newline, which reads
the same replies alike except one that writes "Action:" inside its thought before the real call.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import json5
from tqdm import tqdm

from qwenlm.eval.batching import batches, greedy_generation
from qwenlm.eval.cache import ItemCache
from qwenlm.eval.data import EvalDataError, _read_jsonl, _text_field
from qwenlm.files import write_text
from qwenlm.tokenizer import Tokenizer
from qwenlm.tools import OBSERVATION_STOP, parse_react_reply

POSITIVE = "exam_plugin_v20231206_react_positive.jsonl"
NEGATIVE = "exam_plugin_v20231206_react_negative.jsonl"
TASK = "plugin-chat"
# Qwen README "Tool Usage" table (benchmark v20231206): tool selection accuracy %, tool input Rouge-L, false
# positive %. No figure was published for the Int4/Int8 releases.
OFFICIAL = {
    "Qwen-1.8B-Chat": (85.0, 0.839, 27.6),
    "Qwen-7B-Chat": (95.5, 0.900, 11.6),
    "Qwen-14B-Chat": (96.9, 0.917, 5.6),
    "Qwen-72B-Chat": (98.2, 0.927, 1.1),
}


@dataclass(frozen=True)
class PluginItem:
    split: str  # "positive" or "negative"
    line: int
    prompt: str
    response: str  # the reference reply


def read_plugin(path: str | Path, split: str) -> list[PluginItem]:
    path = Path(path)
    return [PluginItem(split, n, _text_field(f"{path}: line {n}", obj, "prompt"),
                       _text_field(f"{path}: line {n}", obj, "response")) for n, obj in _read_jsonl(path)]


def plugin_files(data: str | Path) -> dict[str, Path]:
    """--data: the folder holding the official files (either may be absent, not both), or one of the files
    (its name ending in _positive.jsonl or _negative.jsonl says which set it is)."""
    data = Path(data)
    if data.is_dir():
        found = {s: data / name for s, name in (("positive", POSITIVE), ("negative", NEGATIVE))
                 if (data / name).is_file()}
        if not found:
            raise EvalDataError(f"{data}: holds neither {POSITIVE} nor {NEGATIVE} (see docs/eval.md)")
        return found
    for split in ("positive", "negative"):
        if data.name.endswith(f"_{split}.jsonl"):
            return {split: data}
    raise EvalDataError(f"{data}: a plugin file's name ends in _positive.jsonl or _negative.jsonl "
                        f"(the official {POSITIVE} / {NEGATIVE})")


def check_args(args) -> None:
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    plugin_files(args.data)
    for name in ("shots", "subjects", "fewshot_prompt"):
        if getattr(args, name, None) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: the plugin benchmark has none (0-shot chat prompts)")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def normalized_input(arguments: str | None) -> str:
    """evaluate_plugin.py's Action Input: re-written by json5 -> json.dumps(sort_keys), "" if unreadable."""
    try:
        return json.dumps(json5.loads(arguments or ""), ensure_ascii=False, sort_keys=True)
    except ValueError:
        return ""


def token_string(tok: Tokenizer, text: str) -> str:
    """The script's `_get_tokenized_string`: Qwen tokens (bytes decoded with "replace") joined by spaces."""
    ids = tok.encode(text, allowed_special="all")  # QWenTokenizer.encode's default
    return " ".join(tok.token_bytes[i].decode("utf-8", errors="replace") for i in ids)


class _WhitespaceTokenizer:
    """evaluate_plugin.py's `_DummyTokenizer`: rouge_score's own tokenizer would drop the non-alphanumerics."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def input_rouge_l(tok: Tokenizer, reply_arguments: str | None, reference_arguments: str | None) -> float:
    from rouge_score import rouge_scorer  # imports nltk: only when scoring
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    target = token_string(tok, normalized_input(reference_arguments))
    prediction = token_string(tok, normalized_input(reply_arguments))
    return scorer.score(target, prediction)["rougeL"].fmeasure


def has_action(reply: str) -> bool:
    return "\nAction: " in reply  # the script's test, for both the positive and the negative set


def score_reply(tok: Tokenizer, item: PluginItem, reply: str) -> dict:
    """One item's result line: the reply and its scores."""
    if item.split == "negative":
        return dict(reply=reply, bad=has_action(reply))
    got, want = parse_react_reply(reply), parse_react_reply(item.response)
    right = has_action(reply) and (got.name or "").strip().lower() == (want.name or "").strip().lower()
    return dict(reply=reply, action=got.name, action_right=right,
                rouge=input_rouge_l(tok, got.arguments, want.arguments))


def summarize(records: list[dict]) -> dict:
    pos = [r for r in records if r["split"] == "positive"]
    neg = [r for r in records if r["split"] == "negative"]
    return dict(positive_count=len(pos), negative_count=len(neg),
                action_right_rate=100.0 * sum(r["action_right"] for r in pos) / len(pos) if pos else None,
                action_input_rouge=sum(r["rouge"] for r in pos) / len(pos) if pos else None,
                bad_rate=100.0 * sum(r["bad"] for r in neg) / len(neg) if neg else None)


def markdown_table(s: dict, model: str = "Qwen-7B-Chat") -> str:
    ref = OFFICIAL[model]
    rows = [("tool selection (accuracy %)", s["action_right_rate"], ref[0], "{:.1f}"),
            ("tool input (Rouge-L)", s["action_input_rouge"], ref[1], "{:.3f}"),
            ("false positive (%)", s["bad_rate"], ref[2], "{:.1f}")]
    lines = [f"| metric | measured | official ({model}) | difference |", "| --- | ---: | ---: | ---: |"]
    for name, value, official, fmt in rows:
        signed = fmt.replace("{:", "{:+")
        measured, diff = ("-", "-") if value is None else (fmt.format(value), signed.format(value - official))
        lines.append(f"| {name} | {measured} | {fmt.format(official)} | {diff} |")
    return "\n".join(lines) + "\n"


def run(args, load_model) -> dict:
    """Generate the replies not yet in the cache, score them, write `summary.json` and `summary.md` under
    `<out>/plugin-chat/` and return the summary."""
    check_args(args)
    items = [(f"{split}/{it.line}", it) for split, path in plugin_files(args.data).items()
             for it in read_plugin(path, split)[:args.limit]]
    folder = Path(args.out) / TASK
    model = os.path.abspath(args.model) if Path(args.model).is_dir() else args.model
    cache = ItemCache(folder, dict(benchmark="plugin", chat=True, model=model, max_new_tokens=args.max_new_tokens))
    todo = [(k, it) for k, it in items if k not in cache.done]
    llm = load_model() if todo else None
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=TASK, unit="item") as bar:
        try:
            for chunk in batches(todo, args.batch_size):
                replies = llm.generate([it.prompt for _, it in chunk], chat_format="chatml",
                                       **greedy_generation(args, stop=[OBSERVATION_STOP]))
                cache.add([dict(key=key, split=it.split, line=it.line, **score_reply(llm.tokenizer, it, reply))
                           for (key, it), reply in zip(chunk, replies)])
                bar.update(len(chunk))
        except KeyboardInterrupt:
            bar.close()
            raise KeyboardInterrupt(f"{len(cache.done)} items kept in {cache.path}; "
                                    f"run the same command again to go on") from None
    summary = summarize([cache.done[k] for k, _ in items])
    table = markdown_table(summary)
    official = dict(zip(("action_right_rate", "action_input_rouge", "bad_rate"), OFFICIAL["Qwen-7B-Chat"]))
    write_text(folder / "summary.json", json.dumps(dict(benchmark="plugin", chat=True, **summary,
                                                        official_model="Qwen-7B-Chat", official=official),
                                                   indent=1) + "\n")
    write_text(folder / "summary.md", f"# plugin (chat), {summary['positive_count']} positive and "
                                      f"{summary['negative_count']} negative items\n\n{table}")
    print(table, end="")
    return summary
