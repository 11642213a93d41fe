import socket
import time

from eval_fixtures import HUMANEVAL_TASKS, write_jsonl
from qwenlm.eval.data import read_humaneval
from qwenlm.eval.results import accuracy
from qwenlm.eval.sandbox import pass_at_k, run_humaneval, run_program


def test_passing_and_failing_programs():
    assert run_program("import math\nassert math.isclose(0.1 + 0.2, 0.3)").passed
    res = run_program("assert 1 == 2, 'wrong'")
    assert res.status == "failed" and "AssertionError: wrong" in res.detail


def test_infinite_loop_is_killed_on_time():
    t = time.monotonic()
    res = run_program("while True:\n    pass", timeout=1.0)
    assert res.status == "timed out" and time.monotonic() - t < 5


def test_huge_allocation_fails_inside_the_memory_limit():
    res = run_program("x = bytearray(64 * 1024 ** 3)\n", memory_bytes=512 << 20)
    assert res.status == "failed" and "MemoryError" in res.detail


def test_fork_bomb_is_stopped():
    t = time.monotonic()
    res = run_program("import os\nwhile True:\n    os.fork()\n", timeout=2.0, max_processes=8)
    assert not res.passed and time.monotonic() - t < 10
    assert res.isolation["processes"] in ("audit hook (no new processes)", "RLIMIT_NPROC")


def test_socket_cannot_reach_a_listener_on_this_machine():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        res = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                          "s.sendall(b'leak')\n")
        assert res.status == "failed" and ("OSError" in res.detail or "PermissionError" in res.detail)
        assert res.isolation["network"] in ("network namespace", "audit hook on socket creation")
        try:
            server.accept()
            raise AssertionError("the sandboxed program reached the listener")
        except socket.timeout:
            pass
    finally:
        server.close()


def test_humaneval_scores_the_other_items(tmp_path):
    tasks = read_humaneval(write_jsonl(tmp_path / "HumanEval.jsonl", HUMANEVAL_TASKS * 1))
    extra = [{**HUMANEVAL_TASKS[1], "task_id": f"HumanEval/{n}"} for n in (2, 3, 4)]
    tasks += read_humaneval(write_jsonl(tmp_path / "more.jsonl", extra))
    completions = {
        "HumanEval/0": "    return a + b\n",            # right
        "HumanEval/1": "    while True:\n        pass\n",  # hangs
        "HumanEval/2": "    return 2 * x\n",            # right
        "HumanEval/3": "    import os\n    while True:\n        os.fork()\n",
        # HumanEval/4: no completion
    }
    records = run_humaneval(tasks, completions, timeout=1.0)
    assert [r.status for r in records] == ["passed", "timed out", "passed", "failed", "failed"]
    assert accuracy(records).overall == 40.0


def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-12
    assert abs(pass_at_k(4, 1, 2) - 0.5) < 1e-12  # 1 - C(3,2)/C(4,2)
