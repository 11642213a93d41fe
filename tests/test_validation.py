"""One set of rules for every generation setting (qwenlm.sampling), and every way in uses it: SamplingParams,
GenerationConfig (generation_config.json, `:conf`), the Python API, the CLI and the server's request fields.
A bad value is a ParamError (a ValueError) whose `field` names the setting, raised before any work starts."""

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

import qwenlm
from qwenlm import cli
from qwenlm.config import ConfigError, GenerationConfig
from qwenlm.engine import LLM
from qwenlm.sampling import ParamError, SamplingParams, wrap_seed
from qwenlm.server.protocol import ChatCompletionRequest, CompletionRequest, validation_error
from qwenlm.terminal_chat import TerminalChat

BAD_SAMPLING = [
    ("temperature", -1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "hot"),
    ("top_p", 0), ("top_p", 1.5), ("top_p", "high"),
    ("top_k", -2), ("top_k", 2.5), ("top_k", 2 ** 64),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("max_tokens", 0), ("max_tokens", 2.5), ("max_tokens", "ten"), ("max_tokens", True),
    ("stop", [""]), ("stop", ""), ("stop", [3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", "x"), ("stop_token_ids", [1.5]),
    ("seed", "x"), ("seed", 2 ** 63), ("seed", -2 ** 63 - 1), ("seed", 2 ** 70), ("seed", 3.0),
    ("n", 0), ("logprobs", "yes"), ("ignore_eos", 1),
]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)


@pytest.mark.parametrize("name,value", BAD_SAMPLING)
def test_sampling_params_rules_name_the_field(name, value):
    with pytest.raises(ParamError) as e:
        SamplingParams(**{name: value})
    assert e.value.field == name and str(e.value).startswith(name) and isinstance(e.value, ValueError)


def test_good_values_are_kept_and_normalised():
    p = SamplingParams(temperature=0, top_p=1, top_k=np.int64(5), seed=2 ** 63 - 1, stop="x", stop_token_ids=(3,))
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stop_token_ids) == (0.0, 1.0, 5, 2 ** 63 - 1,
                                                                                  ["x"], [3])
    assert type(p.top_k) is int and SamplingParams(seed=-2 ** 63).seed == -2 ** 63
    with pytest.raises(ParamError, match=r"stop_token_ids\[1\] is 151851, outside the vocabulary \(0..151850\)"):
        SamplingParams(stop_token_ids=[5, 151851]).check_vocab(151851)
    # offsets from a seed at the edge wrap into int64 and keep the low 32 bits the sampler draws from
    assert wrap_seed(2 ** 63) == -2 ** 63 and wrap_seed(2 ** 63 + 7) % 2 ** 32 == (2 ** 63 + 7) % 2 ** 32


@pytest.mark.parametrize("name,value", [("top_p", "high"), ("temperature", -1), ("max_new_tokens", 0),
                                        ("max_new_tokens", 2.5), ("do_sample", "yes"), ("chat_format", "llama"),
                                        ("seed", 2 ** 64), ("max_window_size", 0), ("stop_words_ids", [[-1]])])
def test_generation_config_uses_the_same_rules(name, value):
    with pytest.raises(ParamError) as e:
        GenerationConfig().replace(**{name: value})
    assert e.value.field.startswith(name)


def test_generation_config_file_errors_name_file_and_key_and_null_means_default(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"chat_format": "chatml", "top_p": "high"}))
    with pytest.raises(ConfigError, match=r"generation_config\.json: top_p must be a number in \(0, 1\], got 'high'"):
        GenerationConfig.from_file(path)
    path.write_text(json.dumps({"top_p": None, "top_k": None, "max_new_tokens": 64, "pad_token_id": None}))
    gen = GenerationConfig.from_file(path)
    assert (gen.top_p, gen.top_k, gen.max_new_tokens, gen.pad_token_id) == (0.8, 0, 64, None)


@pytest.mark.parametrize("call,field", [
    (lambda m: m.generate("hi", max_new_tokens="ten"), "max_new_tokens"),
    (lambda m: m.generate("hi", max_new_tokens=2.5), "max_new_tokens"),
    (lambda m: m.generate("hi", seed="x"), "seed"),
    (lambda m: m.generate("hi", seed=2 ** 70), "seed"),
    (lambda m: m.generate("hi", repetition_penalty=0), "repetition_penalty"),
    (lambda m: m.generate("hi", temperature=math.inf), "temperature"),
    (lambda m: m.generate("hi", stop=[""]), "stop"),
    (lambda m: m.generate("hi", stop_token_ids=[10 ** 9]), "stop_token_ids"),
    (lambda m: m.generate("hi", chat_format="llama"), "chat_format"),
    (lambda m: m.generate("hi", top_q=0.5), "top_q"),
    (lambda m: m.generate(None), "prompt"),
    (lambda m: m.generate(["a", None]), "prompt"),
    (lambda m: m.chat("hi", system=None), "system"),
    (lambda m: m.chat(None), "query"),
    (lambda m: m.chat("hi", history="oops"), "history"),
    (lambda m: m.chat("hi", history=[("q",)]), "history"),
    (lambda m: m.chat_stream("hi", max_window_size=0), "max_window_size"),  # at the call, not at the first delta
    (lambda m: m.chat_stream("hi", top_p=2), "top_p"),
])
def test_python_api_errors_are_param_errors_before_any_work(llm, call, field):
    with pytest.raises(ParamError) as e:
        call(llm)
    assert e.value.field == field
    assert not llm.engine.requests  # nothing was queued


def test_load_checks_its_arguments_before_reading_the_folder():
    for kwargs, field in [(dict(device="tpu"), "device"), (dict(dtype="int3"), "dtype"),
                          (dict(quantize="int2"), "quantize")]:
        with pytest.raises(ParamError) as e:
            qwenlm.load("/no/such/model", **kwargs)
        assert e.value.field == field


def test_api_seed_at_the_int64_edge_runs(llm):
    # a batch offsets the seed per prompt; at the edge that must wrap, not overflow the sampler's int64
    a = llm.generate(["Hello", "Hi"], seed=2 ** 63 - 1, max_new_tokens=3)
    assert a == llm.generate(["Hello", "Hi"], seed=2 ** 63 - 1, max_new_tokens=3)


def test_engine_samples_of_a_seed_at_the_int64_edge(tiny_ckpt):
    engine = LLM(tiny_ckpt, device="cpu")
    outs = engine.generate([[1, 2, 3]], SamplingParams(seed=2 ** 63 - 1, n=2, max_tokens=2, ignore_eos=True))
    assert len(outs[0].outputs) == 2


# ---- the server's request models: the same rules, as a 400 naming the field ----------------------------

@pytest.mark.parametrize("fields,param", [
    # every range the server enforced before
    ({"temperature": -0.5}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"n": 0}, "n"), ({"n": 17}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"max_length": 0}, "max_length"), ({"stop": [""]}, "stop"), ({"temperature": "hot"}, "temperature"),
    # and what slipped through: a seed the engine's int64 sampler cannot hold, negative stop ids, infinities
    ({"seed": 2 ** 63}, "seed"), ({"seed": -2 ** 63 - 1}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"temperature": math.inf}, "temperature"), ({"top_p": math.nan}, "top_p"),
])
def test_server_request_fields_follow_the_shared_rules(fields, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields})
    err = validation_error(e.value)
    assert (err.status, err.param) == (400, param)


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 0, "top_p must be a number in (0, 1], got 0.0"),
    ("seed", 2 ** 63, f"seed must be at most 2**63 - 1 (int64), got {2 ** 63}"),
    ("max_completion_tokens", 0, "max_completion_tokens must be an integer >= 1, got 0"),
])
def test_server_range_errors_are_the_shared_rules_messages(field, value, message):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], field: value})
    assert validation_error(e.value).message == f"{field}: {message}"


def test_server_good_values_and_completion_max_tokens():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "seed": -2 ** 63,
                                                "stop": "a", "top_k": -1, "temperature": 0})
    assert req.seed == -2 ** 63 and req.stop == "a"
    assert CompletionRequest.model_validate({"prompt": "x"}).max_tokens == 16
    # 0 scores the prompt alone (with echo; without it the handler answers 400, tests/test_server_logprobs.py)
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": 0, "echo": True}).max_tokens == 0
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": -1})
    assert validation_error(e.value).param == "max_tokens"


# ---- the CLI: every argument checked before a model loads ------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--temperature", "-1"], "temperature must be a number >= 0"),
    (["generate", "x", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["generate", "x", "--top-p", "2"], "top_p must be a number in (0, 1], got 2.0"),
    (["generate", "x", "--seed", str(2 ** 70)], "seed must be at most 2**63 - 1"),
    (["chat", "--seed", str(2 ** 64)], "seed must be at most 2**63 - 1"),
    (["make-tiny", "/no/such/out", "--seed", str(2 ** 64)], "seed must be at most 2**63 - 1"),
    (["chat", "--device", "tpu"], "device 'tpu' is not one of cpu, cuda, cuda:N"),
    (["chat", "--device", "mps"], "device 'mps': qwenlm runs on cpu or cuda"),
    (["generate", "x", "--dtype", "int3"], "dtype 'int3' is not one of"),
    (["serve", "--port", "99999"], "port must be in 0..65535, got 99999"),
    (["serve", "--host", "no-such-host.invalid"], "host 'no-such-host.invalid' does not resolve"),
    (["quantize", "--data", "d.json", "--out", "o", "--device", "cuda:x"], "device 'cuda:x' is not one of"),
])
def test_cli_arguments_fail_before_the_model_loads(argv, message, capsys):
    # the model does not exist: an error about the argument shows it was checked first
    model = [] if argv[0] == "make-tiny" else ["--model", "/no/such/model"]
    assert cli.main([argv[0], *model, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "/no/such/model" not in err


def test_cli_cuda_without_a_gpu_and_port_in_use_are_one_line_exit_2(tmp_path):
    import socket
    import torch
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["serve", "--model", "/no/such/model", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")]
        if not torch.cuda.is_available():
            cases.append((["chat", "--model", "/no/such/model", "--device", "cuda"], "no CUDA GPU is available"))
        for argv, message in cases:
            proc = subprocess.run([sys.executable, "-m", "qwenlm.cli", *argv], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
            assert proc.stderr.count("\n") == 1


# ---- the terminal chat: `:conf` checks values; a failing turn keeps the conversation ---------------------

def chat_session(llm, lines, **kw):
    out = io.StringIO()
    chat = TerminalChat(llm, system="You are a helpful assistant.", out=out)
    script = iter(lines)

    def read(prompt):
        out.write(prompt)
        item = next(script)
        if isinstance(item, BaseException):
            raise item
        return item

    chat.run(read=read, **kw)
    return chat, out.getvalue()


@pytest.mark.parametrize("setting", ["temperature=-1", "top_p=2", "max_new_tokens=0", "temperature=abc",
                                     "max_new_tokens=2.5", "seed=1e30", "chat_format=llama"])
def test_conf_rejects_bad_values_and_the_chat_goes_on(llm, setting):
    chat, out = chat_session(llm, [":conf max_new_tokens=2", f":conf do_sample=False {setting}", "hello", ":q"])
    name = setting.partition("=")[0]
    assert f"[error] {name}" in out and "settings unchanged" in out
    assert llm.generation_config.max_new_tokens == 2 and llm.generation_config.do_sample  # nothing applied
    assert len(chat.history) == 1 and "Traceback" not in out
    llm.generation_config = chat.original_conf


def test_a_failing_turn_prints_the_error_and_keeps_the_history(llm, monkeypatch):
    real = type(llm).chat_stream
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            def broken():
                yield "partial"
                raise RuntimeError("device lost")
            return broken()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(llm), "chat_stream", flaky)
    chat, out = chat_session(llm, [":conf max_new_tokens=2", "one", "two", "three", ":his", ":q"])
    assert "[error] RuntimeError: device lost" in out
    assert [q for q, _ in chat.history] == ["one", "three"]
    assert "User[1]: three" in out
    llm.generation_config = chat.original_conf


def test_ctrl_c_at_the_prompt_needs_a_second_one_soon_after(llm):
    times = iter([0.0, 10.0, 11.0])
    chat, out = chat_session(llm, [":conf max_new_tokens=2", "hi", KeyboardInterrupt(), KeyboardInterrupt(),
                                   KeyboardInterrupt(), "unreached"], clock=lambda: next(times))
    # the first and the one 10 s later only warn; the one a second after that leaves
    assert out.count("[press Ctrl-C again within 3 s to leave, or type :exit]") == 2
    assert len(chat.history) == 1
    chat, out = chat_session(llm, [KeyboardInterrupt(), "", EOFError()], clock=lambda: 0.0)
    assert out.count("press Ctrl-C again") == 1  # Ctrl-D still leaves at once
    llm.generation_config = chat.original_conf
