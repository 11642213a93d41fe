"""The tool-use ("plugin") benchmark: files in the official layout, scored as evaluate_plugin.py does, with
scripted models (each request's reply chosen from its own prompt) whose scores are known in advance.

Rouge-L expectations are worked by hand from the Qwen tokens of the normalised Action Inputs (joined by
spaces and split on whitespace, as the official script does):
  {"city": "Paris"}       -> {"  city  ":  "  Paris  "}            (6)
  {"city": "Berlin"}      -> {"  city  ":  "  Berlin  "}           (6)
  {"query": "qwen"}       -> {"  query  ":  "  q  wen  "}          (7)
  {"expression": "2+2"}   -> {"  expression  ":  "  2  +  2  "}    (8)
  {"city": "Rome"}        -> {"  city  ":  "  R  ome  "}           (7)
"""
import json
from argparse import Namespace

import pytest

import qwenlm
from engine_helpers import PromptScriptedHead
from eval_fixtures import PLUGIN_NEGATIVE, PLUGIN_POSITIVE, write_jsonl, write_plugin
from qwenlm import cli
from qwenlm.eval import plugin, run as eval_run
from qwenlm.eval.data import EvalDataError

ALWAYS_WEATHER = 'Thought: I will check the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}'


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)
    llm.script = PromptScriptedHead(llm.tokenizer, llm.model, llm.engine.runner)
    return llm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_plugin(tmp_path_factory.mktemp("plugin"))


def oracle(prompt: str) -> str:
    """The reference reply of the item whose question the prompt holds (its Observation and Final Answer
    too: generation must stop at "Observation:")."""
    for question, *_, reply in PLUGIN_POSITIVE + PLUGIN_NEGATIVE:
        if f"Question: {question}<|im_end|>" in prompt:
            return reply
    raise AssertionError(f"unknown prompt {prompt[-80:]!r}")


def args(data, out, **kw):
    return Namespace(**{**dict(benchmark="plugin", model="tiny", data=str(data), out=str(out), chat=True, shots=None,
                               subjects=None, fewshot_prompt=None, limit=None, batch_size=4, max_new_tokens=None), **kw})


def lines(out):
    return [json.loads(x) for x in (out / "plugin-chat" / "items.jsonl").read_text().splitlines()]


def test_oracle_scores_full_marks_through_the_batched_engine(llm, data, tmp_path, capsys):
    llm.script.use(oracle)
    summary = eval_run.run(args(data, tmp_path), lambda: llm)
    assert summary == dict(positive_count=5, negative_count=3, action_right_rate=100.0, action_input_rouge=1.0,
                           bad_rate=0.0)
    replies = {r["key"]: r["reply"] for r in lines(tmp_path)}
    # Generation stopped at "Observation:": the reply ends with the Action Input, as the engine cut it.
    assert replies["positive/1"] == 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}'
    assert replies["negative/1"] == "Thought: No tool is needed.\nFinal Answer: I am a helpful assistant."
    # The prompt is the data's, sent as a chat query with the default system prompt (model.chat).
    sent = next(p for p in llm.script.prompts if "Question: What is 2+2?" in p)
    assert sent.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "Answer the following questions as best you can.")
    assert sent.endswith("Question: What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    md = (tmp_path / "plugin-chat" / "summary.md").read_text()
    assert "| tool selection (accuracy %) | 100.0 | 95.5 | +4.5 |" in md
    assert "| tool input (Rouge-L) | 1.000 | 0.900 | +0.100 |" in md
    assert "| false positive (%) | 0.0 | 11.6 | -11.6 |" in md and md.split("\n", 2)[2] in capsys.readouterr().out


def test_always_calling_one_tool_scores_the_expected_shares(llm, data, tmp_path):
    llm.script.use(lambda prompt: ALWAYS_WEATHER)
    summary = eval_run.run(args(data, tmp_path, batch_size=3), lambda: llm)
    # get_weather is the reference tool of 3 of the 5 positive items; every negative reply calls a tool.
    assert summary["action_right_rate"] == pytest.approx(60.0) and summary["bad_rate"] == pytest.approx(100.0)
    # Paris 6/6; Berlin LCS 5 of 6|6; qwen 4 of 6|7; 2+2 4 of 6|8; Rome 5 of 6|7 (F = 2PR / (P + R)).
    rouge = [1.0, 5 / 6, 8 / 13, 4 / 7, 10 / 13]
    assert [r["rouge"] for r in lines(tmp_path) if r["split"] == "positive"] == pytest.approx(rouge)
    assert summary["action_input_rouge"] == pytest.approx(sum(rouge) / 5)


def test_scoring_follows_the_official_rules(llm):
    tok = llm.tokenizer
    item = plugin.PluginItem("positive", 1, "p", PLUGIN_POSITIVE[0][2])
    # Key order, spacing and quotes do not matter: both inputs are re-written by json5 + sort_keys.
    same = plugin.score_reply(tok, item, "Thought: x\nAction: GET_WEATHER \nAction Input: {'city':'Paris'}")
    assert same["action_right"] and same["rouge"] == 1.0
    # Without "\nAction: " the tool does not count as selected (the script's test), its input still scores.
    bare = plugin.score_reply(tok, item, 'Action: get_weather\nAction Input: {"city": "Paris"}')
    assert not bare["action_right"] and bare["rouge"] == 1.0
    broken = plugin.score_reply(tok, item, "Thought: x\nAction: get_weather\nAction Input: {city: ")
    assert broken["action_right"] and broken["rouge"] == 0.0
    assert plugin.normalized_input('{"b": [1, 2,], a: "é"}') == '{"a": "é", "b": [1, 2]}'
    neg = plugin.PluginItem("negative", 1, "p", PLUGIN_NEGATIVE[0][1])
    assert plugin.score_reply(tok, neg, "Thought: y\nAction: search\nAction Input: {}")["bad"]
    assert not plugin.score_reply(tok, neg, "Final Answer: Action: none")["bad"]


def test_resume_skips_done_items_and_gives_the_same_totals(llm, data, tmp_path):
    llm.script.use(oracle)
    loads = []

    def load():
        loads.append(1)
        return llm

    first = eval_run.run(args(data, tmp_path, limit=2), load)
    assert first["positive_count"] == 2 and first["negative_count"] == 2
    before = len(llm.script.prompts)
    llm.script.use(oracle)
    full = eval_run.run(args(data, tmp_path), load)
    assert len(llm.script.prompts) == 4 and before > 0  # only the 3 + 1 items not done yet were generated
    assert full["action_right_rate"] == 100.0 and full["bad_rate"] == 0.0
    assert eval_run.run(args(data, tmp_path), lambda: pytest.fail("nothing is left to generate")) == full
    assert len(loads) == 2


def test_cli_runs_the_benchmark(tiny_ckpt, data, tmp_path):
    # The command itself, with its own (unscripted, random) model: wiring, cache and summary files.
    assert cli.main(["eval", "plugin", "--model", str(tiny_ckpt), "--device", "cpu", "--data", str(data),
                     "--out", str(tmp_path), "--limit", "1", "--max-new-tokens", "3"]) == 0
    summary = json.loads((tmp_path / "plugin-chat" / "summary.json").read_text())
    assert (summary["positive_count"], summary["negative_count"]) == (1, 1)
    assert summary["official"] == {"action_right_rate": 95.5, "action_input_rouge": 0.9, "bad_rate": 11.6}
    assert [r["key"] for r in lines(tmp_path)] == ["positive/1", "negative/1"]


def test_cli_checks_and_single_files(tiny_ckpt, data, tmp_path, capsys):
    base = ["eval", "plugin", "--model", str(tiny_ckpt), "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(base + ["--data", str(tmp_path)]) == 2
    assert "holds neither exam_plugin_v20231206_react_positive.jsonl" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(data), "--shots", "5"]) == 2
    assert "--shots: the plugin benchmark has none" in capsys.readouterr().err
    odd = write_jsonl(tmp_path / "tools.jsonl", [{"prompt": "p", "response": "r"}])
    assert cli.main(base + ["--data", str(odd)]) == 2
    assert "ends in _positive.jsonl or _negative.jsonl" in capsys.readouterr().err
    assert plugin.plugin_files(data / plugin.NEGATIVE) == {"negative": data / plugin.NEGATIVE}
    bad = write_jsonl(tmp_path / "x_react_positive.jsonl", [{"prompt": "p"}])
    with pytest.raises(EvalDataError, match=r"x_react_positive.jsonl: line 1: field 'response' is missing"):
        plugin.read_plugin(bad, "positive")
