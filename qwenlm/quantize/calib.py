"""Calibration data for GPTQ: fine-tuning conversations (spec §15) or plain text, as token id lists."""

from __future__ import annotations

import json
from pathlib import Path

from qwenlm.files import read_json_lines
from qwenlm.tokenizer import Tokenizer

SYSTEM_MESSAGE = "You are a helpful assistant."  # fixed by the official finetune.py, never read from data
ROLES = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}


def conversation_ids(tok: Tokenizer, conversation: list[dict], max_len: int) -> list[int]:
    """The input ids the official finetune.py / run_gptq.py `preprocess` builds for one conversation.

    system = <|im_start|> "system" \\n SYSTEM <|im_end|> \\n, then per message tok(role) \\n tok(value)
    <|im_end|> \\n; a first message not from the user is dropped; truncated to max_len (no padding).
    """
    nl = tok.encode("\n")
    ids = [tok.im_start_id] + tok.encode("system") + nl + tok.encode(SYSTEM_MESSAGE) + [tok.im_end_id] + nl
    messages = list(conversation)
    if messages and messages[0].get("from") != "user":
        messages = messages[1:]
    for i, msg in enumerate(messages):
        role = msg.get("from")
        if role not in ROLES:
            raise ValueError(f"calibration message {i}: role {role!r} is not 'user' or 'assistant'")
        ids += tok.encode(ROLES[role], allowed_special="all") + nl
        ids += tok.encode(str(msg.get("value", "")), allowed_special="all") + [tok.im_end_id] + nl
    return ids[:max_len]


def text_ids(tok: Tokenizer, text: str, max_len: int) -> list[list[int]]:
    """Plain text cut into consecutive pieces of at most max_len tokens."""
    ids = tok.encode(text, allowed_special="all")
    return [ids[i:i + max_len] for i in range(0, len(ids), max_len)]


def _read_items(path: Path) -> list:
    """The samples of a calibration file: a .json list, .jsonl lines, or one .txt text."""
    if path.suffix not in (".json", ".jsonl", ".txt"):
        raise ValueError(f"{path}: calibration data must be a .json or .jsonl file of conversations "
                         f"(the fine-tuning format) or strings, or a .txt file of plain text; got a "
                         f"{path.suffix or 'suffix-less'!r} file")
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); is it a binary file?") from None
    if path.suffix == ".txt":
        return [text]
    if path.suffix == ".jsonl":
        return [v for _, v in read_json_lines(
            text.splitlines(), lambda n, _, msg: ValueError(f"{path}: line {n} is not valid JSON ({msg})"))]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of conversations or strings, got a {type(items).__name__}")
    return items


def check_sample(where: str, i: int, item) -> None:
    """A string with text, or {"conversations": [{"from": "user"|"assistant", "value": str}, ...]} (the
    official fine-tuning format); anything else would calibrate on almost nothing, so it is an error."""
    at = f"{where}: sample {i}"
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{at}: empty text")
        return
    if not isinstance(item, dict) or "conversations" not in item:
        got = f"an object with keys {', '.join(map(repr, item))}" if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"{at}: expected a string or an object with a 'conversations' list, got {got}")
    conv = item["conversations"]
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{at}: 'conversations' must be a non-empty list of messages, got {conv!r:.60}")
    for j, msg in enumerate(conv):
        where_msg = f"{at}, conversations[{j}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where_msg}: expected an object {{\"from\": ..., \"value\": ...}}, got {msg!r:.60}")
        for key in ("from", "value"):
            if key not in msg:
                raise ValueError(f"{where_msg}: missing {key!r} (the official format is {{\"from\": \"user\" or "
                                 f"\"assistant\", \"value\": text}}; this message has keys "
                                 f"{', '.join(map(repr, msg)) or 'none'})")
        if msg["from"] not in ROLES:
            raise ValueError(f"{where_msg}: 'from' is {msg['from']!r}; expected 'user' or 'assistant'")
        if not isinstance(msg["value"], str):
            raise ValueError(f"{where_msg}: 'value' must be a string, got {msg['value']!r:.60}")


def load_calibration(source, tok: Tokenizer, max_len: int = 8192, max_samples: int | None = None) -> list[list[int]]:
    """Token id lists from a path (.json list of conversations or strings, .jsonl, or .txt), or from such a
    list itself. Every sample is checked first: an error names the file, the sample and the field."""
    if isinstance(source, (str, Path)):
        where = str(source)
        items = _read_items(Path(source))
    else:
        where = "calibration data"
        items = list(source)
    if not items:
        raise ValueError(f"{where}: no calibration samples")
    for i, item in enumerate(items):
        check_sample(where, i, item)
    samples: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            samples += text_ids(tok, item, max_len)
        else:
            samples.append(conversation_ids(tok, item["conversations"], max_len))
    if max_samples is not None:
        samples = samples[:max_samples]
    return samples
