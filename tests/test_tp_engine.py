"""Tensor parallelism through the engine: `LLM(path, tensor_parallel_size=2)` runs rank 1 in a spawned process (gloo
on the CPU) and gives the greedy ids and logprobs of one process; a dead rank is a clear error within seconds and
leaves no process behind; sizes that do not split are refused before any process starts."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from qwenlm import cli
from qwenlm.engine import LLM
from qwenlm.engine.tp_engine import load_tp_engine_model
from qwenlm.engine.tp_workers import TPWorkerError
from qwenlm.model.loader import load_model
from qwenlm.parallel.tp import TPError
from qwenlm.sampling import ParamError, SamplingParams
from qwenlm.testing import make_tiny_checkpoint

GPTQ = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}
# seq_length 16: the 40-token prompts run with NTK alpha 7 and LogN, the short ones without (and in one batch)
CKPTS = {
    "bf16": dict(dtype=torch.bfloat16, bf16=True, seed=7, seq_length=16),
    # the MLP is 3 groups of 32 wide: the ranks hold 2 and 1
    "int4": dict(dtype=torch.float16, fp16=True, seed=8, seq_length=16, intermediate_size=192,
                 quantization_config=GPTQ, layout="sharded"),
}
# a small prefill budget chunks the long prompts (chunks attend to cached slots), and the repeated prompt hits the
# prefix cache
ENGINE = dict(dtype=torch.float32, num_blocks=96, block_size=4, max_num_batched_tokens=24)


def _prompts():
    g = torch.Generator().manual_seed(4)
    long = [torch.randint(0, 151851, (40,), generator=g).tolist() for _ in range(2)]
    short = [[151644, 872, 198, 108386, 151645, 198], [9707, 11, 1879]]
    return short + long


def _children() -> list[int]:
    """Live (not zombie) processes this one spawned (multiprocessing's spawn_main: the workers)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and spawned:
            out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-engine")
    return {name: make_tiny_checkpoint(root / name, **kw) for name, kw in CKPTS.items()}


@pytest.mark.parametrize("name", CKPTS)
def test_two_ranks_give_the_ids_and_logprobs_of_one_process(folders, name):
    """fp32 compute; the all-reduces sum partial products in another order, so logprobs agree to float32 rounding
    (atol 1e-5) and the greedy ids exactly."""
    prompts = _prompts()
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)] * 3 + \
             [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, prompt_logprobs=2)]
    one = LLM(str(folders[name]), **ENGINE)
    want = one.generate(prompts, params)
    llm = LLM(str(folders[name]), tensor_parallel_size=2, **ENGINE)
    try:
        worker = llm.model.tp_workers.procs[0]
        cfg = llm.model.config
        assert llm.runner.k_cache.shape[3] == cfg.num_attention_heads // 2  # rank 0 pools its heads only
        assert llm.model.lm_head.weight.shape[0] == cfg.vocab_size // 2
        got = llm.generate(prompts, params)
        got_again = llm.generate(prompts[2:3], params[2:3])  # its prompt again: from the prefix cache
        assert llm.blocks.hit_rate > 0
    finally:
        llm.shutdown()
    assert worker.exitcode == 0 and not _children()  # told to stop, it left the process group and exited
    for g, w in zip(got + got_again, want + want[2:3]):
        g, w = g.outputs[0], w.outputs[0]
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        assert (g.top_logprobs is None) == (w.top_logprobs is None)
        for gt, wt in zip(g.top_logprobs or [], w.top_logprobs or []):
            assert gt.keys() == wt.keys() and all(abs(gt[k] - wt[k]) < 1e-5 for k in gt)
    torch.testing.assert_close(torch.tensor(got[3].prompt_logprobs[1:]), torch.tensor(want[3].prompt_logprobs[1:]),
                               atol=1e-5, rtol=0)


def test_ctrl_c_stops_a_call_not_the_engine_and_a_killed_worker_is_a_clear_error(folders):
    llm = LLM(str(folders["bf16"]), tensor_parallel_size=2, **ENGINE)
    worker = llm.model.tp_workers.procs[0]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = [r.outputs[0].token_ids for r in llm.generate(_prompts(), greedy)]
    # Ctrl-C in a terminal reaches every process of its group: the worker ignores it, rank 0 stops the call there
    os.kill(worker.pid, signal.SIGINT)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        while True:
            if not llm.has_unfinished():
                llm.add_request(None, _prompts()[2], SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
            llm.step()
    for request_id in list(llm.requests):
        llm.abort(request_id)
    assert [r.outputs[0].token_ids for r in llm.generate(_prompts(), greedy)] == before  # the ranks are in step
    for prompt in _prompts()[:3]:
        llm.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):  # prefills and decode steps, one step always in flight
        llm.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TPWorkerError, match=rf"tensor-parallel rank 1 of 2 \(pid {worker.pid}\) was killed by signal "
                                            "SIGKILL"):
        while llm.has_unfinished():
            llm.step()
    assert time.monotonic() - start < 15
    with pytest.raises(TPWorkerError, match="rank 1 of 2"):  # and every later call says so at once
        llm.generate([1, 2, 3])
    llm.shutdown()
    assert not _children()


def test_a_worker_that_raises_is_named_with_its_traceback(folders):
    """A worker that fails inside a step (here: handed a record that is no step) exits; rank 0 names it and shows
    the worker's traceback."""
    llm = LLM(str(folders["int4"]), tensor_parallel_size=2, **ENGINE)
    llm.model.tp_workers.records.send("not a step")
    with pytest.raises(TPWorkerError, match=r"(?s)tensor-parallel rank 1 of 2 \(pid \d+\) raised:\nTraceback.*"
                                            r"AttributeError: 'str' object has no attribute 'alphas'"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=4))
    llm.shutdown()
    assert not _children()


def test_a_worker_that_dies_while_loading_is_named(folders):
    """The worker is killed before it has loaded its slice: rank 0 (waiting for it) names it, no rendezvous hangs."""
    def kill_first_worker():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for child in multiprocessing.active_children():
                if child.name == "qwenlm-tp-rank1":
                    os.kill(child.pid, signal.SIGKILL)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    start = time.monotonic()
    with pytest.raises(TPWorkerError, match=r"rank 1 of 2 \(pid \d+\) was killed by signal SIGKILL while loading"):
        LLM(str(folders["bf16"]), tensor_parallel_size=2, **ENGINE)
    killer.join()
    assert time.monotonic() - start < 30 and not _children()


def test_workers_exit_when_rank_0_dies(folders, tmp_path):
    """Rank 0's process killed outright (no shutdown runs): its worker notices and exits."""
    script = ("import os, signal, sys, torch\n"
              "from qwenlm.engine import LLM\n"
              "if __name__ == '__main__':\n"
              f"    llm = LLM({str(folders['bf16'])!r}, tensor_parallel_size=2, dtype=torch.float32, num_blocks=16)\n"
              "    llm.generate([1, 2, 3])\n"
              "    print(llm.model.tp_workers.procs[0].pid, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    path = tmp_path / "rank0.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), f"worker {pid} outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sizes_that_do_not_split_fail_before_any_process_starts(folders):
    with pytest.raises(TPError, match=r"tensor_parallel_size 3 does not divide num_attention_heads 4 \(config.json\)"):
        LLM(str(folders["bf16"]), tensor_parallel_size=3)
    with pytest.raises(ParamError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        LLM(str(folders["bf16"]), tensor_parallel_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(TPError, match="needs 2 GPUs on this host, 0 visible"):
            load_tp_engine_model(folders["bf16"], 2, "cuda", None)
    with pytest.raises(ValueError, match="tensor_parallel_size needs a checkpoint folder"):
        LLM(load_model(folders["bf16"], progress=False), tensor_parallel_size=2)  # a loaded, whole model
    assert not _children()


def test_cli_generate_over_two_ranks(folders, capsys):
    args = ["generate", "--model", str(folders["bf16"]), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens",
            "5", "--temperature", "0", "Hello"]
    assert cli.main(args) == 0
    one = capsys.readouterr().out
    assert cli.main(args + ["--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == one
    assert cli.main(args + ["-tp", "3"]) == 2
    assert "does not divide num_attention_heads 4" in capsys.readouterr().err
    assert cli.main(args + ["-tp", "2", "--quantize", "int8"]) == 2
    assert "cannot be combined with tensor_parallel_size 2" in capsys.readouterr().err
