"""Token ids and training labels of one conversation, by the official `finetune.py` `preprocess` (spec §15).

Official rule (default): every turn, system and user included, keeps `<|im_start|>`, `<|im_end|>` and the
"\\n" after `<|im_end|>` in the labels; assistant content is trained; role names, the "\\n" after them and
the system/user text are IGNORE_TOKEN_ID. The model's loss shifts labels, so it learns to emit
`<|im_start|>` after every turn's closing newline and `<|im_end|>` after user/system text too.

`assistant_only=True` (not official) trains only assistant content and its `<|im_end|>`: the model then
never learns to open turns, which is what inference needs (the prompt always ends in
"<|im_start|>assistant\\n") and avoids the repeated-`<|im_start|>` replies users reported after SFT.
"""

from __future__ import annotations

from qwenlm.tokenizer import Tokenizer
from qwenlm.train.formats import Conversation

IGNORE_TOKEN_ID = -100  # transformers' LabelSmoother.ignore_index, as finetune.py


def encode_conversation(tok: Tokenizer, conv: Conversation,
                        assistant_only: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation, with no truncation or padding.

    finetune.py calls `tokenizer(text)` with the tokenizer's default `allowed_special="all"`, so special-token
    text inside the data becomes control tokens; this does the same to produce the same ids.
    """
    def enc(text: str) -> list[int]:
        return tok.encode(text, allowed_special="all")

    nl = enc("\n")
    im_start, im_end = tok.im_start_id, tok.im_end_id
    ignore = IGNORE_TOKEN_ID
    input_ids: list[int] = []
    labels: list[int] = []
    # finetune.py tokenizes "<|im_start|>user" as one string; with specials allowed that is
    # [im_start] + enc("user"), so one builder serves system and the turns.
    for role, text in [("system", conv.system), *conv.turns]:
        role_ids, content = enc(role), enc(text)
        ids = [im_start] + role_ids + nl + content + [im_end] + nl
        head = [ignore] * (len(role_ids) + len(nl))  # role name and its newline: never trained
        if role == "assistant":
            if assistant_only:
                tgt = [ignore] + head + content + [im_end] + [ignore] * len(nl)
            else:
                tgt = [im_start] + head + content + [im_end] + nl
        else:
            if assistant_only:
                tgt = [ignore] * len(ids)
            else:
                tgt = [im_start] + head + [ignore] * len(content) + [im_end] + nl
        input_ids += ids
        labels += tgt
    return input_ids, labels
