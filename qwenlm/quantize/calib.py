"""Calibration data for GPTQ: fine-tuning conversations (spec §15) or plain text, as token id lists."""

from __future__ import annotations

import json
from pathlib import Path

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


def load_calibration(source, tok: Tokenizer, max_len: int = 8192, max_samples: int | None = None) -> list[list[int]]:
    """Token id lists from: a path (.json list of conversations or strings, or .txt), or such a list itself."""
    where = "calibration data"
    if isinstance(source, (str, Path)) and Path(source).suffix in (".json", ".txt", ".jsonl"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        where = str(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            items = [text]
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
    elif isinstance(source, str):
        items = [source]
    else:
        items = list(source)
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a JSON list of conversations or strings")
    samples: list[list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            samples += text_ids(tok, item, max_len)
        elif isinstance(item, dict) and isinstance(item.get("conversations"), list):
            samples.append(conversation_ids(tok, item["conversations"], max_len))
        else:
            raise ValueError(f"{where}: item {i} is neither a string nor an object with a 'conversations' list")
    samples = [s for s in samples if s]
    if max_samples is not None:
        samples = samples[:max_samples]
    if not samples:
        raise ValueError(f"{where}: no calibration samples")
    return samples
