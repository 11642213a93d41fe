"""`qwenlm serve --tensor-parallel-size 2` (gloo on the CPU): the engine process is rank 0 and spawns rank 1. The
same replies, usage and logprobs as the one-process in-process engine for mixed concurrent requests; a rank killed
mid-stream fails the running requests with a 503 / error event naming it, turns /health unhealthy and leaves no
process behind; SIGTERM leaves no process either; a size that does not split the model exits 1 before loading."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from qwenlm.engine import LLM, AsyncEngine
from qwenlm.engine.core import CheckpointFactory, CoreSpec
from qwenlm.engine.core_client import EngineClient
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from qwenlm.testing import make_tiny_checkpoint
from qwenlm.tokenizer import Tokenizer
from test_server_cli import free_port, start_serve
from test_server_process import MIXED, assert_close, kill_in_flight, run_all

# fp32 compute on a bf16 checkpoint (the weights widen exactly): the two ranks' all-reduces sum partial products in
# another order than one process, which moves a logprob by float32 rounding (~1e-6, within assert_close's
# LOGPROB_ATOL), and the greedy texts not at all.
DTYPE = "fp32"
BOUND_S = 20.0  # a dead rank is reported, and every process of the engine is gone, within this


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp-serve") / "Qwen-tiny-bf16", dtype=torch.bfloat16,
                                bf16=True, seed=7)


@pytest.fixture(scope="module")
def served(folder, tmp_path_factory):
    """`qwenlm serve -tp 2` in a session of its own, its log in a file; the last test below stops it."""
    log = open(tmp_path_factory.mktemp("tp-serve-log") / "serve.log", "w+b")
    proc, url = start_serve(folder, "--tensor-parallel-size", "2", "--dtype", DTYPE,
                            "--timeout-graceful-shutdown", "1", stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)
    tree = psutil.Process(proc.pid).children(recursive=True)
    yield proc, url, tree
    if proc.poll() is None:
        proc.kill()
    for p in tree:
        if p.is_running():
            p.kill()
    proc.wait()
    log.close()


def _rank1(tree: list[psutil.Process]) -> psutil.Process:
    workers = [p for p in tree if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in tree]
    return workers[0]


def _all_gone(processes, timeout: float) -> list[str]:
    """The processes still alive after `timeout` seconds (none, when all exited)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [" ".join(p.cmdline())[:120] for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_same_replies_usage_and_logprobs_as_one_process(served, folder):
    proc, url, tree = served
    core = [p for p in tree if "qwenlm.engine.core" in " ".join(p.cmdline())]
    assert len(core) == 1 and _rank1(tree).ppid() == core[0].pid  # the engine process spawned rank 1
    got = asyncio.run(run_all(url, MIXED))
    engine = AsyncEngine(LLM(str(folder), device="cpu", dtype=DTYPE))
    try:
        with ServerThread(create_app(engine, engine.engine.tokenizer, "tiny")) as one:
            want = asyncio.run(run_all(one.url, MIXED))
    finally:
        engine.shutdown()
    assert_close(got, want)
    assert any(reason == "stop" for s, _ in got for _, _, reason, *rest in s)  # the stop string cut a reply


def test_a_rank_killed_mid_stream_fails_requests_with_503_and_leaves_no_process(folder, caplog):
    engine = EngineClient(CoreSpec(CheckpointFactory(str(folder), "cpu", DTYPE, tensor_parallel_size=2)),
                          Tokenizer.from_folder(folder))
    try:
        core = psutil.Process(engine.process.pid)
        tree = core.children(recursive=True)  # rank 1 and multiprocessing's resource tracker
        worker = _rank1(tree)
        with ServerThread(create_app(engine, engine.tokenizer, "tiny")) as srv:
            started = time.monotonic()
            full, events = asyncio.run(asyncio.wait_for(kill_in_flight(srv.url, engine, worker.kill), BOUND_S))
            assert full.status_code == 503 and full.json()["error"]["code"] == "engine_unavailable"
            assert "tensor-parallel rank 1 of 2" in full.json()["error"]["message"]
            assert "killed by signal SIGKILL" in full.json()["error"]["message"]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 503 and "tensor-parallel rank 1 of 2" in health.json()["error"]
            # the engine process first, through its Popen: psutil's wait would reap it and hide its status
            assert engine.process.wait(BOUND_S) == 1  # it reported the rank and exited, not killed
            assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE
            assert _all_gone(tree, BOUND_S - (time.monotonic() - started)) == []
    finally:
        engine.shutdown()
    assert any("tensor-parallel rank 1 of 2" in rec.getMessage() for rec in caplog.records)


def test_a_size_that_does_not_split_the_heads_exits_1_before_loading(folder):
    r = subprocess.run([sys.executable, "-m", "qwenlm.cli", "serve", "--model", str(folder), "--device", "cpu",
                        "--tensor-parallel-size", "3", "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "tensor_parallel_size 3 does not divide num_attention_heads 4 (config.json)" in r.stderr
    assert "engine process started" not in r.stderr and "Traceback" not in r.stderr


def test_sigterm_leaves_no_process(served):
    """Last: it stops the module's server (rank 1 still alive, so the shutdown has workers to stop)."""
    proc, url, tree = served
    assert all(p.is_running() for p in tree)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert _all_gone(tree, 10) == [], "a process of the engine outlived the server"
