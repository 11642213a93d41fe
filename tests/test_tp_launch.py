"""Tensor parallelism started by torchrun (gloo on the CPU): nothing is spawned, RANK 0 runs the engine and prints,
the other rank follows. `qwenlm generate` over one torchrun of 2 processes and over two torchruns of one "node" each
(a shared rendezvous on localhost) prints the one-process greedy text; WORLD_SIZE != --tensor-parallel-size is a
clear error; a rank killed on the other "node" ends an `LLM(path, tensor_parallel_size=2)` script with the error
naming it within a bound, and no process of either run is left."""

import re
import subprocess
import sys
import time

import psutil
import pytest
import torch

from qwenlm.engine.tp_launch import BEAT_S, HEARTBEAT_TIMEOUT_S
from qwenlm.testing import make_tiny_checkpoint
from test_server_cli import free_port

GEN = ["--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "8", "--temperature", "0", "Hello there"]
BOUND_S = HEARTBEAT_TIMEOUT_S + 2 * BEAT_S + 10  # the heartbeat names the dead rank; then every process exits
SCRIPT = """
import sys, torch
from qwenlm.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", dtype=torch.float32, num_blocks=32, block_size=4)
print("ready", flush=True)  # rank 0 only: rank 1 runs the worker loop inside LLM(...) and exits there
while True:
    llm.generate([[9707, 11, 1879]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
"""


def _torchrun(*args, nnodes=1, nproc=2, node_rank=None, endpoint=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc)]
    if endpoint:  # the static rendezvous (torchrun's default with --master-addr): node 0 holds rank 0
        host, port = endpoint.split(":")
        cmd += ["--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    else:
        cmd += ["--master-port", str(free_port())]
    return cmd + list(args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp-launch") / "tiny", dtype=torch.bfloat16, bf16=True, seed=7)


@pytest.fixture(scope="module")
def one_process(folder):
    r = subprocess.run([sys.executable, "-m", "qwenlm.cli", "generate", "--model", str(folder), *GEN],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_one_host_two_processes_print_the_one_process_text(folder, one_process):
    r = subprocess.run(_torchrun("-m", "qwenlm.cli", "generate", "--model", str(folder), "-tp", "2", *GEN),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == one_process  # once: rank 1 prints nothing


def test_two_nodes_on_localhost_print_the_one_process_text(folder, one_process):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(_torchrun("-m", "qwenlm.cli", "generate", "--model", str(folder), "-tp", "2", *GEN,
                                        nnodes=2, nproc=1, node_rank=n, endpoint=endpoint),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    out = [p.communicate(timeout=90) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [e[-3000:] for _, e in out]
    assert out[0][0] == one_process and out[1][0] == ""


def test_world_size_other_than_the_tensor_parallel_size_is_a_clear_error(folder):
    r = subprocess.run(_torchrun("-m", "qwenlm.cli", "generate", "--model", str(folder), "-tp", "2", *GEN, nproc=1),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "qwenlm: error: the launcher started WORLD_SIZE=1 processes but --tensor-parallel-size is 2" in r.stderr
    assert not re.search(r'File ".*/qwenlm/', r.stderr)  # our message, not a traceback of ours (torchrun adds its own)


def test_a_rank_killed_on_the_other_node_ends_the_script_with_its_name(folder, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(_torchrun(str(script), str(folder), nnodes=2, nproc=1, node_rank=n, endpoint=endpoint),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    try:
        assert nodes[0].stdout.readline() == "ready\n", nodes[0].stderr.read()[-3000:]
        trees = [psutil.Process(p.pid).children(recursive=True) for p in nodes]
        rank1 = [p for p in trees[1] if str(script) in " ".join(p.cmdline())]
        assert len(rank1) == 1
        time.sleep(1)  # a few steps in flight
        started = time.monotonic()
        rank1[0].kill()
        err = nodes[0].communicate(timeout=BOUND_S)[1]
        assert time.monotonic() - started < BOUND_S
        nodes[1].wait(timeout=10)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert "TPWorkerError: tensor-parallel rank 1 of 2 (host " in err, err[-3000:]
    assert "stopped answering (no heartbeat for" in err
    _, alive = psutil.wait_procs(trees[0] + trees[1], timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
