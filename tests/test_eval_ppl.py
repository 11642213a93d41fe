"""`qwenlm eval ppl` on a tiny checkpoint whose seq_length is 32, so lengths past it use NTK and LogN."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenlm
from qwenlm import cli
from qwenlm.eval import ppl
from qwenlm.model.qwen import DenseKVCache
from qwenlm.testing import make_tiny_checkpoint

SEQ = 32
LENGTHS = [16, 32, 48, 64]
TEXT = ("Long-context perplexity: the quick brown fox jumps over the lazy dog, 0123456789; "
        "长上下文困惑度测试，敏捷的棕色狐狸跳过了懒狗。 ") * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ppl") / "Qwen-tiny", seed=3, seq_length=SEQ)
    # The official init gives near-uniform attention and logits, where RoPE base and LogN barely move the
    # NLL; sharper q/k and lm_head weights make position handling visible in the perplexity.
    state = load_file(folder / "model.safetensors")
    for name in state:
        if name.endswith("c_attn.weight"):
            state[name] = state[name] * 8
        elif name == "lm_head.weight":
            state[name] = state[name] * 5
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def llm(ckpt):
    return qwenlm.load(str(ckpt), device="cpu", progress=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl-data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def official_alpha(length: int) -> float:
    # get_ntk_alpha written out again from the spec (§5.4), not imported: 1 up to SEQ, then 3, 7, ...
    return max(2 ** math.ceil(math.log2(length / SEQ) + 1) - 1, 1)


@torch.inference_mode()
def direct_nll(model, ids: list[int], on: bool) -> float:
    """Mean NLL of one window: all logits at once -> log_softmax -> the next token's entry."""
    x = torch.tensor([ids])
    cache = DenseKVCache(model.config.num_hidden_layers)
    cache.begin(torch.ones_like(x, dtype=torch.bool))
    alpha = official_alpha(len(ids)) if on else 1.0
    logn = on and len(ids) > SEQ
    hidden = model(x, torch.arange(len(ids))[None], cache, model.inv_freq([alpha], "cpu"), use_logn=logn)
    logp = torch.log_softmax(model.lm_head(hidden[0]).double(), -1)[:-1]
    return float(-logp.gather(1, x[0, 1:, None]).mean())


def direct_mean_nll(llm, length: int, on: bool) -> float:
    tokens = llm.tokenizer.encode(TEXT)
    windows = [tokens[i * length:(i + 1) * length] for i in range(len(tokens) // length)]
    return sum(direct_nll(llm.model, w, on) for w in windows) / len(windows)


def test_cli_matches_direct_computation_and_writes_outputs(ckpt, llm, text, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ppl, "LOGITS_CHUNK", 7)  # the lm_head in several chunks, one of them short
    assert cli.main(["eval", "ppl", "--model", str(ckpt), "--device", "cpu", "--data", str(text),
                     "--lengths", ",".join(map(str, LENGTHS)), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ppl.json").read_text())
    rows = {r["length"]: r for r in result["rows"]}
    n_tokens = len(llm.tokenizer.encode(TEXT))
    assert result["seq_length"] == SEQ and result["text_tokens"] == n_tokens and sorted(rows) == LENGTHS
    for L in LENGTHS:
        assert rows[L]["windows"] == n_tokens // L and rows[L]["tokens"] == (n_tokens // L) * (L - 1)
        assert rows[L]["alpha"] == official_alpha(L)
        for mode, on in (("ntk_logn", True), ("plain", False)):
            assert rows[L][f"nll_{mode}"] == pytest.approx(direct_mean_nll(llm, L, on), abs=1e-5)
            assert rows[L][f"ppl_{mode}"] == pytest.approx(math.exp(rows[L][f"nll_{mode}"]), rel=1e-12)
    # Up to seq_length alpha is 1 and LogN is off, so the two runs are the same computation.
    for L in (16, 32):
        assert rows[L]["ppl_ntk_logn"] == rows[L]["ppl_plain"]
    for L in (48, 64):
        assert abs(rows[L]["nll_ntk_logn"] - rows[L]["nll_plain"]) > 1e-4  # fp32 noise is ~1e-6
    md = (tmp_path / "ppl.md").read_text()
    assert "| length | ppl NTK+LogN | ppl plain |" in md and f"| 64 | {rows[64]['ppl_ntk_logn']:.4g} |" in md
    assert md in capsys.readouterr().out
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ntk_and_logn_each_change_the_long_window(llm):
    # Past seq_length both parts act: NTK alone and LogN alone each move the NLL away from plain RoPE.
    ids = llm.tokenizer.encode(TEXT)[:64]
    on, _ = ppl.window_nll(llm.model, ids, ntk_logn=True)
    off, _ = ppl.window_nll(llm.model, ids, ntk_logn=False)
    assert on / 63 == pytest.approx(direct_nll(llm.model, ids, True), abs=1e-5)
    assert off / 63 == pytest.approx(direct_nll(llm.model, ids, False), abs=1e-5)
    x = torch.tensor([ids])
    cache = DenseKVCache(llm.model.config.num_hidden_layers)
    cache.begin(torch.ones_like(x, dtype=torch.bool))
    with torch.inference_mode():
        h = llm.model(x, torch.arange(64)[None], cache, llm.model.inv_freq([1.0], "cpu"), use_logn=True)
    logn_only = float(-torch.log_softmax(llm.model.logits(h[0]), -1)[:-1].gather(1, x[0, 1:, None]).sum())
    assert len({round(v, 4) for v in (on, off, logn_only)}) == 3


def test_text_shorter_than_a_length_is_a_clear_error(ckpt, llm, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only", encoding="utf-8")
    n = len(llm.tokenizer.encode("a few words only"))
    assert cli.main(["eval", "ppl", "--model", str(ckpt), "--device", "cpu", "--data", str(short),
                     "--lengths", "2,64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qwenlm: error: --data {short}: the text has {n} tokens, fewer than the length 64; "
                   "give a longer text or drop that length from --lengths"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lengths, message",
                         [("1024,x", "--lengths 1024,x: give comma-separated"), ("1,8", "--lengths: each length must be at least 2"),
                          (",", "--lengths: give at least one"), ("8 --chat", "--chat: not used by ppl")])
def test_bad_arguments_fail_before_loading(tmp_path, text, capsys, lengths, message):
    assert cli.main(["eval", "ppl", "--model", str(tmp_path / "missing"), "--data", str(text),
                     "--lengths", *lengths.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwenlm: error: {message}") and len(err.strip().splitlines()) == 1
