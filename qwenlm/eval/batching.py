"""How every benchmark hands its items to the model: in batches, decoding greedily as the official scripts set it."""

from __future__ import annotations


def batches(seq: list, size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def greedy_generation(args, **extra) -> dict:
    gen = dict(temperature=0, repetition_penalty=1.0, **extra)  # greedy, as evaluate_chat_*.py set it
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    return gen
