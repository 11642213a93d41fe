"""`qwenlm eval ppl`: perplexity of a text at several context lengths, with dynamic NTK + LogN (the official
inference behaviour) and without (plain RoPE, no LogN), as the Qwen README's long-context table.

For each length L the text's tokens are cut into non-overlapping windows of L tokens (the remainder is
dropped); each window is one forward from an empty cache, and the L-1 next-token NLLs of every window are
averaged into one perplexity. What "on" computes is what the official `QWenModel.forward` does for that
whole window at prefill (spec §5.4, §6): one NTK alpha chosen once from the full window length L (not
growing token by token), and LogN on the queries of positions past seq_length because key_len = L >
seq_length. So every token of a window longer than seq_length, the early ones included, is computed with
the stretched RoPE base: that is the official whole-window figure, not a token-by-token decode.

One difference: the official LogN buffer holds 32767 entries (spec §6), so an official single forward of
32768 tokens or more would index past it (UNVERIFIED: read from the code, not run); here the LogN formula
is applied at every position, so such lengths work.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from qwenlm.files import write_text
from qwenlm.model.qwen import DenseKVCache, QWenLMHeadModel, ntk_alpha

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768"
MODES = ("ntk_logn", "plain")
LOGITS_CHUNK = 1024  # lm_head rows at a time: a 32K window's full fp32 logits would take ~20 GB


def parse_lengths(text: str) -> list[int]:
    """`--lengths 1024,2048`: distinct context lengths, each at least 2 tokens (one prediction)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {text}: give comma-separated token counts, e.g. {DEFAULT_LENGTHS}") from None
    if not lengths:
        raise ValueError("--lengths: give at least one length")
    bad = [n for n in lengths if n < 2]
    if bad:
        raise ValueError(f"--lengths: each length must be at least 2 tokens, got {bad[0]}")
    return sorted(set(lengths))


def check_args(args) -> None:
    """What can be wrong before the model loads: the text file and the lengths."""
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file (ppl needs a plain text file)")
    parse_lengths(args.lengths)
    for flag, value in (("--chat", args.chat), ("--shots", args.shots), ("--subjects", args.subjects),
                        ("--fewshot-prompt", args.fewshot_prompt), ("--limit", args.limit)):
        if value not in (None, False):  # silently ignoring a benchmark option would mislead
            raise ValueError(f"{flag}: not used by ppl (the text is scored as is)")


def read_tokens(path: str | Path, tokenizer) -> list[int]:
    """The text's token ids, special-token strings encoded as plain text (the file is data, not markup)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return tokenizer.encode(text)


def check_text_long_enough(n_tokens: int, lengths: list[int], path) -> None:
    too_long = [n for n in lengths if n > n_tokens]
    if too_long:
        raise ValueError(f"--data {path}: the text has {n_tokens} tokens, fewer than the length {too_long[0]}; "
                         f"give a longer text or drop that length from --lengths")


@torch.inference_mode()
def window_nll(model: QWenLMHeadModel, ids: list[int], ntk_logn: bool) -> tuple[float, int]:
    """Sum of next-token NLLs over one window (one forward from an empty cache), and their count (len-1).

    ntk_logn=True: the official inference path, alpha = ntk_alpha(len) when use_dynamic_ntk, LogN when
    the window passes seq_length (the model applies it then, as the official code does). False: alpha 1
    and no LogN, i.e. plain RoPE."""
    cfg = model.config
    device = model.lm_head.weight.device
    L = len(ids)
    x = torch.tensor(ids, device=device)[None, :]  # [1,L]
    positions = torch.arange(L, device=device)[None, :]
    alpha = ntk_alpha(L, cfg.seq_length) if (ntk_logn and cfg.use_dynamic_ntk) else 1.0
    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(torch.ones_like(x, dtype=torch.bool))
    hidden = model(x, positions, cache, model.inv_freq([alpha], device), use_logn=None if ntk_logn else False)[0]
    del cache  # the K/V of every layer: free before the lm_head chunks
    total = 0.0
    for s in range(0, L - 1, LOGITS_CHUNK):
        e = min(s + LOGITS_CHUNK, L - 1)
        logp = torch.log_softmax(model.logits(hidden[s:e]), dim=-1)  # [n,V] fp32
        total -= float(logp.gather(1, x[0, s + 1:e + 1, None]).double().sum())
    return total, L - 1


def perplexities(model: QWenLMHeadModel, tokens: list[int], lengths: list[int], progress: bool = True) -> list[dict]:
    """One row per length: windows, tokens scored, mean NLL and perplexity with NTK+LogN and plain."""
    plan = [(L, w) for L in lengths for w in range(len(tokens) // L)]
    rows = {L: {"length": L, "windows": len(tokens) // L, "alpha": ntk_alpha(L, model.config.seq_length)
                if model.config.use_dynamic_ntk else 1.0, **{f"nll_{m}": 0.0 for m in MODES}, "tokens": 0}
            for L in lengths}
    for L, w in tqdm(plan, desc="ppl", unit="window", disable=not progress):
        window = tokens[w * L:(w + 1) * L]
        for mode in MODES:
            nll, n = window_nll(model, window, ntk_logn=mode == "ntk_logn")
            rows[L][f"nll_{mode}"] += nll
        rows[L]["tokens"] += n
    out = []
    for L in lengths:
        r = rows[L]
        for mode in MODES:
            r[f"nll_{mode}"] /= r["tokens"]
            r[f"ppl_{mode}"] = math.exp(r[f"nll_{mode}"])
        out.append(r)
    return out


def markdown(rows: list[dict], seq_length: int) -> str:
    lines = [f"Perplexity per context length (seq_length {seq_length}; non-overlapping windows).", "",
             "| length | ppl NTK+LogN | ppl plain |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['length']} | {r['ppl_ntk_logn']:.4g} | {r['ppl_plain']:.4g} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], seq_length: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    xs = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["ppl_ntk_logn"] for r in rows], "o-", label="dynamic NTK + LogN")
    ax.plot(xs, [r["ppl_plain"] for r in rows], "s--", label="plain RoPE")
    ax.axvline(seq_length, color="gray", linestyle=":", label=f"seq_length {seq_length}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, load_model) -> list[dict]:
    """Tokenize (before the weights load, so a too-short text fails in a second), score, write under --out."""
    from qwenlm.hub import resolve_model
    from qwenlm.tokenizer import Tokenizer
    lengths = parse_lengths(args.lengths)
    tokens = read_tokens(args.data, Tokenizer.from_folder(resolve_model(args.model)))
    check_text_long_enough(len(tokens), lengths, args.data)
    llm = load_model()
    rows = perplexities(llm.model, tokens, lengths)
    seq_length = llm.model.config.seq_length
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "ppl.json", json.dumps({"model": str(args.model), "data": str(args.data),
                                             "text_tokens": len(tokens), "seq_length": seq_length,
                                             "rows": rows}, indent=2))
    table = markdown(rows, seq_length)
    write_text(out / "ppl.md", table)
    plot(rows, seq_length, out / "ppl.png")
    print(table, end="")
    return rows
