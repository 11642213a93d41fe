"""Training conversations from files: the official `finetune.py` format and OpenAI-style messages.

Accepted samples (a JSON list of them, or JSONL with one per line):
- official (spec §15): {"id": ..., "conversations": [{"from": "user"|"assistant", "value": str}, ...]}.
  Extension: a first {"from": "system"} sets this sample's system prompt (official: always
  "You are a helpful assistant."). As the official script, a conversation that opens with an assistant
  turn loses that turn.
- OpenAI: {"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?|"functions"?: [...]}. These go
  through `qwenlm.tools.messages_to_turns`, the server's own conversion, so tool calls and results become
  the same ReAct text the server writes into prompts. That conversion strips contents
  (lstrip("\\n").rstrip(), as the official server does); the official format keeps them verbatim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwenlm.files import read_json_lines
from qwenlm.tools import DEFAULT_SYSTEM, MessagesError, functions_from_tools, messages_to_turns


class DataError(ValueError):
    """Bad training data; names the file, the sample index (0-based) and the field."""

    def __init__(self, file, index: int | None, field: str | None, message: str):
        self.file, self.index, self.field = str(file), index, field
        where = [self.file] + ([f"sample {index}"] if index is not None else []) + ([field] if field else [])
        super().__init__(": ".join(where + [message]))


@dataclass
class Conversation:
    system: str
    turns: list[tuple[str, str]]  # (role, text), role "user" or "assistant"
    file: str = ""
    index: int = 0
    dropped_first_turn: bool = False  # an opening assistant turn was dropped (official rule)


def read_samples(path: str | Path) -> list[dict]:
    """The raw samples of a JSON-list or JSONL file (told apart by the first character, '[' = JSON list)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read: {e}") from None
    if text.lstrip().startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        samples = [v for _, v in read_json_lines(text.splitlines(), lambda n, index, msg: DataError(
            path, index, None, f"invalid JSON on line {n}: {msg}"))]
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise DataError(path, i, None, f"a sample must be a JSON object, got {type(sample).__name__}")
    return samples


def parse_sample(sample: dict, file: str = "", index: int = 0) -> Conversation:
    """One raw sample (either format) -> a Conversation; DataError when it is malformed."""
    if "conversations" in sample:
        conv = _official(sample, file, index)
    elif "messages" in sample:
        conv = _openai(sample, file, index)
    else:
        raise DataError(file, index, None, "needs a 'conversations' (official) or 'messages' (OpenAI) field")
    if not conv.turns:
        raise DataError(file, index, "conversations" if "conversations" in sample else "messages",
                        "the conversation has no user or assistant turn")
    return conv


def _official(sample: dict, file: str, index: int) -> Conversation:
    msgs = sample["conversations"]
    if not isinstance(msgs, list):
        raise DataError(file, index, "conversations", "must be a list of {from, value}")
    system, turns = DEFAULT_SYSTEM, []
    for j, msg in enumerate(msgs):
        where = f"conversations[{j}]"
        if not isinstance(msg, dict):
            raise DataError(file, index, where, "must be an object {from, value}")
        for key in ("from", "value"):
            if key not in msg:
                raise DataError(file, index, f"{where}.{key}", "missing")
        role, value = msg["from"], msg["value"]
        if not isinstance(value, str):
            raise DataError(file, index, f"{where}.value", f"must be a string, got {type(value).__name__}")
        if role == "system":
            if j != 0:
                raise DataError(file, index, f"{where}.from", "a system message is only allowed first")
            system = value
        elif role in ("user", "assistant"):
            turns.append((role, value))
        else:
            raise DataError(file, index, f"{where}.from", f"unknown role {role!r} (user, assistant, system)")
    # finetune.py: `if roles[source[0]["from"]] != roles["user"]: source = source[1:]`
    dropped = bool(turns) and turns[0][0] != "user"
    return Conversation(system, turns[1:] if dropped else turns, str(file), index, dropped)


def _openai(sample: dict, file: str, index: int) -> Conversation:
    messages = sample["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(file, index, "messages", "must be a non-empty list")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        # The server would continue with "Thought:"; a training sample has to show the reply.
        raise DataError(file, index, f"messages[{len(messages) - 1}].role",
                        "a training conversation cannot end with a tool result")
    try:
        functions = functions_from_tools(sample.get("tools"), sample.get("functions"))
        turns = messages_to_turns(messages, functions)
    except MessagesError as e:
        raise DataError(file, index, e.param, str(e)) from None
    pairs = [*turns.history, (turns.query, turns.continuation)]
    out = []
    for user, assistant in pairs:
        out.append(("user", user))
        if assistant is not None:  # None: the conversation ends with a user message
            out.append(("assistant", assistant))
    return Conversation(turns.system, out, str(file), index)
