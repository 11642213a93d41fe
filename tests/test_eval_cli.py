"""`qwenlm eval` end to end on a tiny checkpoint and benchmark files in the official layouts."""
import json

import pytest

import qwenlm
from eval_fixtures import GSM8K_ROWS, HUMANEVAL_TASKS, MMLU_ROWS, write_jsonl, write_mmlu
from qwenlm import cli
from qwenlm.api import QwenLM
from qwenlm.eval import run as eval_run
from qwenlm.eval.choice import score_choice_benchmark
from qwenlm.eval.data import LETTERS, load_choice_benchmark
from qwenlm.eval.extract import extract_choice_en
from qwenlm.eval.engine_logprobs import engine_next_token_logprobs
from qwenlm.eval.model_logprobs import model_next_token_logprobs
from qwenlm.eval.prompts import chat_choice_question
from qwenlm.eval.results import summarize_choice

SUBJECTS = ",".join(MMLU_ROWS)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)


@pytest.fixture(scope="module")
def mmlu(tmp_path_factory):
    return write_mmlu(tmp_path_factory.mktemp("mmlu"))


def eval_cli(ckpt, *argv):
    return cli.main(["eval", *argv, "--model", str(ckpt), "--device", "cpu"])


def items(out, task):
    return [json.loads(line) for line in (out / task / "items.jsonl").read_text().splitlines()]


def test_mmlu_base_end_to_end_matches_direct_scoring(tiny_ckpt, llm, mmlu, tmp_path, capsys):
    assert eval_cli(tiny_ckpt, "mmlu", "--data", str(mmlu), "--subjects", SUBJECTS, "--out", str(tmp_path),
                    "--batch-size", "3") == 0
    summary = json.loads((tmp_path / "mmlu-base" / "summary.json").read_text())
    md = (tmp_path / "mmlu-base" / "summary.md").read_text()
    test = load_choice_benchmark("mmlu", mmlu, "test", list(MMLU_ROWS))
    dev = load_choice_benchmark("mmlu", mmlu, "dev", list(MMLU_ROWS))
    direct = score_choice_benchmark("mmlu", test, dev, llm.tokenizer,
                                    model_next_token_logprobs(llm.model, llm.tokenizer, batch_size=3), batch_size=3)
    expected = summarize_choice("mmlu", direct)
    assert summary["count"] == 6 and summary["overall"] == pytest.approx(expected.overall)
    assert summary["by_category"] == pytest.approx(expected.by_category)
    assert [(r["key"], r["pred"]) for r in items(tmp_path, "mmlu-base")] == \
        [(f"{r.subject}/{r.row}", r.pred) for r in direct]
    # the engine's prefix-cached prefills give the padded forward's probabilities
    for got, want in zip(items(tmp_path, "mmlu-base"), direct):
        assert got["probs"] == pytest.approx(list(want.probs), abs=1e-5)
    assert f"| MMLU | {expected.overall:.1f} | 58.2 |" in md and md.split("\n", 2)[2] in capsys.readouterr().out


def test_interrupted_run_resumes_from_the_cached_items(tiny_ckpt, mmlu, tmp_path, monkeypatch):
    scored = []

    def counting(engine, tokenizer, **kw):
        backend = engine_next_token_logprobs(engine, tokenizer, **kw)
        return lambda prompts, ids: scored.extend(prompts) or backend(prompts, ids)
    monkeypatch.setattr(eval_run, "engine_next_token_logprobs", counting)
    args = ["mmlu", "--data", str(mmlu), "--subjects", SUBJECTS]
    assert eval_cli(tiny_ckpt, *args, "--out", str(tmp_path / "a"), "--limit", "2") == 0
    assert len(scored) == 4 and len(items(tmp_path / "a", "mmlu-base")) == 4
    first = items(tmp_path / "a", "mmlu-base")
    assert eval_cli(tiny_ckpt, *args, "--out", str(tmp_path / "a")) == 0
    assert len(scored) == 6  # only the two items the limited run left
    assert items(tmp_path / "a", "mmlu-base")[:4] == first
    assert eval_cli(tiny_ckpt, *args, "--out", str(tmp_path / "b")) == 0  # uninterrupted
    resumed, whole = (json.loads((tmp_path / d / "mmlu-base" / "summary.json").read_text()) for d in "ab")
    assert resumed == whole and resumed["count"] == 6
    assert len(scored) == 12
    assert eval_cli(tiny_ckpt, *args, "--out", str(tmp_path / "a")) == 0  # all cached: no model call
    assert len(scored) == 12


def test_a_line_cut_by_a_crash_is_redone_and_other_settings_are_refused(tiny_ckpt, mmlu, tmp_path, capsys):
    args = ["mmlu", "--data", str(mmlu), "--subjects", "sociology", "--out", str(tmp_path)]
    assert eval_cli(tiny_ckpt, *args) == 0
    path = tmp_path / "mmlu-base" / "items.jsonl"
    whole = path.read_text()
    path.write_text(whole[:-20])  # the second line half written
    assert eval_cli(tiny_ckpt, *args) == 0
    redone = [json.loads(line) for line in path.read_text().splitlines()]
    before = [json.loads(line) for line in whole.splitlines()]
    assert redone[0] == before[0] and len(redone) == 2  # the whole first line kept, the cut one redone
    assert redone[1]["key"] == before[1]["key"] and redone[1]["pred"] == before[1]["pred"]
    assert redone[1]["probs"] == pytest.approx(before[1]["probs"], abs=1e-5)  # alone, not in a padded batch
    capsys.readouterr()
    assert eval_cli(tiny_ckpt, *args, "--shots", "2") == 2
    err = capsys.readouterr().err
    assert "other settings (shots: 5, now 2)" in err and err.count("\n") == 1


def test_chat_run_goes_through_the_engine_and_extracts_letters(tiny_ckpt, llm, mmlu, tmp_path):
    assert eval_cli(tiny_ckpt, "mmlu", "--chat", "--data", str(mmlu), "--subjects", SUBJECTS, "--limit", "1",
                    "--max-new-tokens", "3", "--out", str(tmp_path)) == 0
    test = load_choice_benchmark("mmlu", mmlu, "test", list(MMLU_ROWS))
    rows = items(tmp_path, "mmlu-chat")
    assert [r["key"] for r in rows] == ["abstract_algebra/1", "sociology/1"]
    for r in rows:
        item = test[r["subject"]][0]
        reply, _ = llm.chat(chat_choice_question("mmlu", item), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=3)
        assert r["reply"] == reply  # what the official model.chat gives, greedy
        assert r["pred"] in LETTERS and r["pred"] == extract_choice_en(reply, item.choices)
        assert r["correct"] == (r["pred"] == item.answer)
    summary = json.loads((tmp_path / "mmlu-chat" / "summary.json").read_text())
    assert summary["overall"] == 100.0 * sum(r["correct"] for r in rows) / 2


def test_bad_data_path_is_one_clear_line_before_any_model_loads(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["eval", "mmlu", "--model", str(tmp_path / "no-model"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == (f"qwenlm: error: --data {missing}: no such file or folder, nor a `datasets` hub name of mmlu "
                   f"(accepted: cais/mmlu, mmlu)\n")
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    assert cli.main(["eval", "gsm8k", "--model", "x", "--data", str(gsm)]) == 2
    assert "--fewshot-prompt FILE" in capsys.readouterr().err


@pytest.mark.parametrize("right", [True, False])
def test_humaneval_pass_at_1_from_scripted_completions(tiny_ckpt, tmp_path, monkeypatch, right):
    solution = {t["prompt"]: t["canonical_solution"] if right else "    return None\n" for t in HUMANEVAL_TASKS}
    seen = []

    def generate(self, prompts, chat_format=None, **overrides):
        seen.append((chat_format, overrides.get("stop"), overrides.get("temperature")))
        return [solution[p] + "\n\ndef unrelated():\n    pass\n" for p in prompts]  # cut at the blank line
    monkeypatch.setattr(QwenLM, "generate", generate)
    data = write_jsonl(tmp_path / "HumanEval.jsonl.gz", HUMANEVAL_TASKS, gz=True)
    assert eval_cli(tiny_ckpt, "humaneval", "--data", str(data), "--out", str(tmp_path)) == 0
    summary = json.loads((tmp_path / "humaneval-base" / "summary.json").read_text())
    assert summary["overall"] == (100.0 if right else 0.0) and summary["count"] == 2
    assert seen and all(s == (None, ["\n\n", "def "], 0) for s in seen)
    rows = items(tmp_path, "humaneval-base")
    assert [r["status"] for r in rows] == ["passed" if right else "failed"] * 2


def test_ctrl_c_keeps_finished_items_and_says_how_to_go_on(tiny_ckpt, mmlu, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(engine, tokenizer, **kw):
        backend = engine_next_token_logprobs(engine, tokenizer, **kw)

        def next_token_logprobs(prompts, ids):
            calls.append(prompts)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return backend(prompts, ids)
        return next_token_logprobs
    monkeypatch.setattr(eval_run, "engine_next_token_logprobs", interrupted)
    assert eval_cli(tiny_ckpt, "mmlu", "--data", str(mmlu), "--subjects", SUBJECTS, "--batch-size", "1",
                    "--out", str(tmp_path)) == 130
    assert len(items(tmp_path, "mmlu-base")) == 1
    assert "run the same command again" in capsys.readouterr().err
