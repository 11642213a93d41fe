"""ChatML prompts exactly as the official `make_context` builds them (spec §12.1), and the chat stop rules."""

from __future__ import annotations

from qwenlm.sampling import ParamError
from qwenlm.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."

History = list[tuple[str, str]]


def chat_stop_ids(tok: Tokenizer) -> set[int]:
    """<|im_end|> and <|im_start|> end a reply (spec §12.2), as does <|endoftext|> (the eos)."""
    return {tok.im_end_id, tok.im_start_id, tok.eod_id}


def build_chat_prompt(tok: Tokenizer, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
                      max_window_size: int = 6144) -> tuple[str, list[int]]:
    """(raw_text, token ids) of a ChatML prompt ending in "<|im_start|>assistant\\n".

    Role and content are encoded piecewise with special tokens disallowed, so a user who types
    "<|im_end|>" gets ordinary text. History turns are kept newest first while system + kept turns stay
    strictly under `max_window_size` tokens (the query is not counted and never truncated).
    """
    nl = tok.encode("\n")
    im_start, im_end = [tok.im_start_id], [tok.im_end_id]

    def turn(role: str, content: str) -> list[int]:
        return im_start + tok.encode(role) + nl + tok.encode(content) + im_end

    system_tokens = turn("system", system)
    context: list[int] = []
    raw = ""
    for q, r in reversed(history or []):
        turn_tokens = nl + turn("user", q) + nl + turn("assistant", r)
        if len(system_tokens) + len(turn_tokens) + len(context) >= max_window_size:
            break  # this turn and every older one are dropped
        context = turn_tokens + context
        raw = f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>" + raw
    ids = system_tokens + context + nl + turn("user", query) + nl + im_start + tok.encode("assistant") + nl
    raw = f"<|im_start|>system\n{system}<|im_end|>" + raw + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return raw, ids


def validate_history(history) -> History:
    """History as a list of (query, response) string pairs; a clear error otherwise."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise ParamError("history", f"history must be a list of (query, response) pairs, got {history!r:.80}")
    out = []
    for i, item in enumerate(history):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ParamError("history", f"history[{i}] must be a (query, response) pair of strings, got {item!r:.80}")
        out.append((item[0], item[1]))
    return out
