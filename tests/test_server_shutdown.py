"""`qwenlm serve` is two processes (the API server and its engine process): Ctrl-C, SIGTERM and the server being
killed all leave no engine process behind."""

import os
import signal
import subprocess

import httpx
import psutil
import pytest

from test_server_cli import start_serve


def start(tiny_ckpt):
    """`qwenlm serve` in a session of its own (as a terminal runs it: Ctrl-C signals the whole group)."""
    proc, url = start_serve(tiny_ckpt, "--timeout-graceful-shutdown", "1", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == 1 and "qwenlm.engine.core" in " ".join(children[0].cmdline())
    return proc, url, children[0]


def gone(process: psutil.Process, timeout: float) -> bool:
    try:
        process.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_signals_stop_both_processes(tiny_ckpt, how):
    proc, url, core = start(tiny_ckpt)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: every process of the group gets it
        else:
            proc.send_signal(signal.SIGTERM)  # the API process alone (systemd's main process, docker stop)
        assert proc.wait(timeout=30) in (0, 130, -signal.SIGTERM)
        assert gone(core, 10), "the engine process outlived the server"
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err  # the engine did not die of the Ctrl-C: it was shut down ...
        assert "API process is gone" not in err  # ... by the server, not by noticing its parent had died
    finally:
        for p in (proc, core):
            if p.poll() is None if p is proc else p.is_running():
                p.kill()


def test_engine_process_exits_when_the_server_is_killed(tiny_ckpt):
    proc, url, core = start(tiny_ckpt)
    try:
        proc.kill()  # no chance to shut anything down
        proc.wait()
        assert gone(core, 10), "the engine process outlived the killed server"
    finally:
        if core.is_running():
            core.kill()
