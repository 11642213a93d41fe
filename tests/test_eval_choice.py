import math

import pytest
import torch

from eval_fixtures import write_ceval, write_cmmlu, write_mmlu
from qwenlm.eval.choice import letter_ids, pick_letter, score_choice_benchmark
from qwenlm.eval.data import LETTERS, load_choice_benchmark
from qwenlm.engine import EngineConfig, LLMEngine
from qwenlm.eval.engine_logprobs import engine_next_token_logprobs
from qwenlm.eval.model_logprobs import last_position_logprobs, model_next_token_logprobs, truncate_left
from qwenlm.eval.prompts import base_choice_prompt, few_shot_prefix
from qwenlm.eval.results import summarize_choice
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import DenseKVCache
from qwenlm.tokenizer import Tokenizer

WRITERS = {"mmlu": (write_mmlu, "test"), "ceval": (write_ceval, "val"), "cmmlu": (write_cmmlu, "test")}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file()


def _load(benchmark, tmp_path):
    writer, split = WRITERS[benchmark]
    root = writer(tmp_path / benchmark)
    return (load_choice_benchmark(benchmark, root, split, list(_subjects(root, split))),
            load_choice_benchmark(benchmark, root, "dev", list(_subjects(root, split))))


def _subjects(root, split):
    return sorted(p.name.rsplit("_", 1)[0] if p.name.endswith(f"_{split}.csv") else p.stem
                  for p in (root / split).iterdir())


def test_letter_tokens_are_single_and_distinct(tok):
    mmlu, ceval = letter_ids(tok, "mmlu"), letter_ids(tok, "ceval")
    assert [tok.decode([i]) for i in mmlu] == [" A", " B", " C", " D"]
    assert [tok.decode([i]) for i in ceval] == list(LETTERS) and ceval == letter_ids(tok, "cmmlu")
    assert len(set(mmlu + ceval)) == 8


def _scripted(answer_of_prompt, letter_ids_expected, favourite=None):
    """A backend that puts its mass on one letter: the right one (oracle) or always `favourite`."""
    def next_token_logprobs(prompts, candidate_ids):
        assert candidate_ids == letter_ids_expected
        out = []
        for p in prompts:
            letter = favourite or answer_of_prompt[p]
            out.append([math.log(0.97) if l == letter else math.log(0.01) for l in LETTERS])
        return out
    return next_token_logprobs


@pytest.mark.parametrize("benchmark", ["mmlu", "ceval", "cmmlu"])
def test_oracle_scores_100_and_always_a_scores_the_share_of_a(benchmark, tmp_path, tok):
    test, dev = _load(benchmark, tmp_path)
    answer_of_prompt = {base_choice_prompt(benchmark, few_shot_prefix(benchmark, s, dev[s]), it): it.answer
                        for s, items in test.items() for it in items}
    ids = letter_ids(tok, benchmark)
    records = score_choice_benchmark(benchmark, test, dev, tok, _scripted(answer_of_prompt, ids), batch_size=3)
    assert len(records) == sum(len(v) for v in test.values()) and all(r.correct for r in records)
    assert summarize_choice(benchmark, records).overall == 100.0
    records = score_choice_benchmark(benchmark, test, dev, tok, _scripted(answer_of_prompt, ids, "A"))
    answers = [it.answer for items in test.values() for it in items]
    assert [r.pred for r in records] == ["A"] * len(answers)
    assert sum(r.correct for r in records) == answers.count("A") < len(answers)
    assert records[0].probs == pytest.approx((0.97 / 1.0, 0.01, 0.01, 0.01))


def test_pick_letter_ties_go_to_the_first_letter():
    assert pick_letter([-1.0, -0.5, -0.5, -3.0])[0] == "B"
    with pytest.raises(ValueError):
        pick_letter([0.0, float("nan"), 0.0, 0.0])


def test_truncation_keeps_the_last_max_minus_one_tokens():
    ids = list(range(10))
    assert truncate_left(ids, 10) == ids and truncate_left(ids, 4) == [7, 8, 9]


def test_model_backend_equals_a_direct_softmax_of_the_last_logits(tiny_ckpt, tok, tmp_path):
    model = load_model(tiny_ckpt, progress=False)
    test, dev = _load("mmlu", tmp_path)
    subject = "abstract_algebra"
    prefix = few_shot_prefix("mmlu", subject, dev[subject])
    prompts = [base_choice_prompt("mmlu", prefix, it) for it in test[subject]]
    prompts[1] = "Question: short?\nAnswer:"  # lengths differ, so the batch is left-padded
    ids = letter_ids(tok, "mmlu")
    batched = model_next_token_logprobs(model, tok, batch_size=4)(prompts, ids)
    for prompt, row in zip(prompts, batched):
        x = torch.tensor([tok.encode(prompt)])
        cache = DenseKVCache(model.config.num_hidden_layers)
        cache.begin(torch.ones_like(x, dtype=torch.bool))
        positions = torch.arange(x.shape[1])[None]
        with torch.no_grad():
            logits = model.logits(model(x, positions, cache, model.inv_freq([1.0], "cpu")))[0, -1]
        direct = torch.softmax(logits, -1)[ids]
        assert torch.allclose(torch.tensor(row).exp(), direct, rtol=1e-4, atol=1e-7)
    # the chosen letter is the argmax of those probabilities
    records = score_choice_benchmark("mmlu", {subject: test[subject]}, dev, tok, model_next_token_logprobs(model, tok))
    for r, prompt in zip(records, [base_choice_prompt("mmlu", prefix, it) for it in test[subject]]):
        lp = last_position_logprobs(model, [tok.encode(prompt)])[0, ids]
        assert r.pred == LETTERS[int(lp.argmax())]


@pytest.mark.parametrize("max_seq_len", [2048, 40])  # 40: every prompt is cut to its last 39 tokens
def test_engine_backend_equals_the_padded_forward_and_computes_the_shared_prefix_once(tiny_ckpt, tok, tmp_path,
                                                                                    max_seq_len):
    model = load_model(tiny_ckpt, progress=False)
    test, dev = _load("mmlu", tmp_path)
    ids = letter_ids(tok, "mmlu")
    engine = LLMEngine(model, tok, EngineConfig(block_size=4))
    backend = engine_next_token_logprobs(engine, tok, max_seq_len=max_seq_len)
    direct = model_next_token_logprobs(model, tok, max_seq_len=max_seq_len)
    for subject, items in test.items():
        prompts = [base_choice_prompt("mmlu", few_shot_prefix("mmlu", subject, dev[subject]), it) for it in items]
        before = engine.stats()
        got = backend(prompts[:3], ids) + backend(prompts[3:], ids)  # a second batch of the same subject
        torch.testing.assert_close(torch.tensor(got), torch.tensor(direct(prompts, ids)), rtol=0, atol=1e-5)
        after = engine.stats()
        total = sum(len(truncate_left(tok.encode(p), max_seq_len)) for p in prompts)
        computed = after["prompt_tokens_total"] - before["prompt_tokens_total"]
        if max_seq_len == 2048:  # the few-shot prefix (hundreds of tokens) is computed once per subject
            shared = len(tok.encode(few_shot_prefix("mmlu", subject, dev[subject])))
            assert shared > 100 and computed < total - (len(prompts) - 1) * (shared - 8)
