"""Model factories for engine processes in tests (core.CoreSpec): module-level functions, so the engine
process imports them by name (it gets the test process's sys.path)."""

from engine_helpers import ScriptedHead
from qwenlm.loading import load_checkpoint


def scripted_tiny(folder: str, reply: str):
    """The tiny checkpoint whose lm_head writes `reply` (then <|im_end|>): a deterministic engine process."""
    ckpt = load_checkpoint(folder, device="cpu", progress=False)
    head = ScriptedHead(ckpt.tokenizer, ckpt.model.config.vocab_size)
    head.say(reply)
    ckpt.model.logits = head
    return ckpt.model, ckpt.tokenizer
