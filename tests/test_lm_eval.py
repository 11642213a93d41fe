"""The real lm-evaluation-harness (`lm_eval` CLI, `--model local-completions`) against a real qwenlm server on the
tiny checkpoint, offline, on two tiny tasks written in lm-eval's YAML + JSON data format: a log-likelihood
multiple-choice task and a generate-until task. lm-eval tokenizes through the server (/tokenizer_info,
/tokenize, /detokenize), scores with echo + logprobs + max_tokens 1, and generates with stop strings; its
log-likelihoods must equal one direct forward of the network, its generations the engine's greedy replies."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engine_helpers import direct_log_softmax
from qwenlm.chat import build_chat_prompt
from qwenlm.engine import LLM, AsyncEngine, SamplingParams
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread

KEY = "lm-eval-key"
MODEL = "Qwen-tiny-Chat"
MC_DOCS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "five"], "answer": 1},
    {"question": "Which city is the capital of France?", "choices": ["Paris", "Rome"], "answer": 0},
    {"question": "巴黎在哪个国家？", "choices": ["法国", "德国", "日本"], "answer": 0},
]
GEN_DOCS = [{"prompt": "Once upon a time", "target": "there"}, {"prompt": "def add(a, b):\n", "target": "return"}]
MAX_GEN_TOKS = 6

MC_YAML = """task: qwenlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_YAML = """task: qwenlm_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    llm = LLM(tiny_ckpt, device="cpu")
    engine = AsyncEngine(llm)
    with ServerThread(create_app(engine, llm.tokenizer, MODEL, api_key=KEY)) as srv:
        srv.ckpt = tiny_ckpt
        yield srv
    engine.shutdown()


def write_tasks(folder):
    for name, docs, yaml, extra in (("mc", MC_DOCS, MC_YAML, {}),
                                    ("gen", GEN_DOCS, GEN_YAML, {"max_gen_toks": MAX_GEN_TOKS})):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(yaml.format(data=data, **extra), encoding="utf-8")


def samples(out, task):
    path = next(out.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def lm_eval(tmp_path, model: str, model_args: str, tasks: str, *extra: str) -> subprocess.CompletedProcess:
    """`lm_eval run` in a child process, offline, on the tasks of write_tasks; results under tmp_path/out."""
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    write_tasks(folder)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": KEY,
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(folder), "--output_path", str(tmp_path / "out"), "--log_samples", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_lm_eval_local_completions_against_qwenlm_serve(served, tmp_path):
    out = tmp_path / "out"
    run = lm_eval(tmp_path, "local-completions",
                  f"model={MODEL},base_url={served.url}/v1/completions,auth_token={KEY},max_retries=1",
                  "qwenlm_tiny_mc,qwenlm_tiny_gen")
    assert "Using remote tokenizer" in run.stderr  # tokenized through the server's /tokenizer_info, /tokenize

    llm = LLM(served.ckpt, device="cpu")  # the oracle runs beside the served engine, not through it
    tok = llm.tokenizer
    mc = sorted(samples(out, "qwenlm_tiny_mc"), key=lambda s: s["doc_id"])
    assert len(mc) == len(MC_DOCS)
    for sample, doc in zip(mc, MC_DOCS):
        context = f"Question: {doc['question']}\nAnswer:"
        got = [float(r[0]) for r in sample["filtered_resps"]]
        want = []
        for choice in doc["choices"]:
            ids, ctx = tok.encode(context + " " + choice), len(tok.encode(context))
            lsm = direct_log_softmax(llm.model, ids)
            want.append(lsm[ctx - 1:-1].gather(1, torch.tensor(ids[ctx:])[:, None]).sum().item())
        assert got == pytest.approx(want, abs=1e-3)  # sums of a few fp32 logprobs, each within 1e-4
        assert sample["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["answer"])

    gen = sorted(samples(out, "qwenlm_tiny_gen"), key=lambda s: s["doc_id"])
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=["\n\n", "<|endoftext|>"],
                            stop_token_ids=[tok.im_end_id, tok.im_start_id, tok.eod_id])
    greedy = llm.generate([tok.encode(d["prompt"]) for d in GEN_DOCS], params)
    assert [s["resps"][0][0] for s in gen] == [o.outputs[0].text for o in greedy]
    assert all(o.outputs[0].text for o in greedy)


def test_lm_eval_local_chat_completions_generates_through_the_chat_route(served, tmp_path):
    run = lm_eval(tmp_path, "local-chat-completions",
                  f"model={MODEL},base_url={served.url}/v1/chat/completions,max_retries=1", "qwenlm_tiny_gen",
                  "--apply_chat_template")
    llm = LLM(served.ckpt, device="cpu")
    tok = llm.tokenizer
    gen = sorted(samples(tmp_path / "out", "qwenlm_tiny_gen"), key=lambda s: s["doc_id"])
    # each document is one user message: the server's ChatML prompt with the default system prompt
    prompts = [build_chat_prompt(tok, d["prompt"])[1] for d in GEN_DOCS]
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=["\n\n"],
                            stop_token_ids=[tok.im_end_id, tok.im_start_id, tok.eod_id])
    greedy = llm.generate(prompts, params)
    assert [s["resps"][0][0] for s in gen] == [o.outputs[0].text for o in greedy], run.stderr[-2000:]
