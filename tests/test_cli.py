"""The `qwenlm` command driven as a user would: piped stdin, a pseudo-terminal with Ctrl-C, one-shot runs."""

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qwenlm
from qwenlm import cli

QWENLM = [sys.executable, "-m", "qwenlm.cli"]


def run_chat(ckpt, script: str) -> str:
    proc = subprocess.run(QWENLM + ["chat", "--model", str(ckpt), "--device", "cpu"], input=script,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)


def test_conf_really_changes_generation_and_history_commands(tiny_ckpt, llm):
    out = run_chat(tiny_ckpt, ":conf max_new_tokens=3 do_sample=False\nhello\n:his\n:clear-history\n:his\n:exit\n")
    expected, _ = llm.chat("hello", max_new_tokens=3, do_sample=False, seed=1234)
    assert f"Qwen: {expected}\n" in out
    assert "max_new_tokens = 3" in out and "do_sample = False" in out
    assert f"User[0]: hello\nQwen[0]: {expected}" in out
    assert "[history cleared]" in out and "[history is empty]" in out


def test_multi_turn_history_and_seed(tiny_ckpt, llm):
    out = run_chat(tiny_ckpt, ":seed 7\n:conf max_new_tokens=4\nfirst\nsecond\n:reset-conf\n:conf\n:exit\n")
    first, history = llm.chat("first", max_new_tokens=4, seed=7)
    second, _ = llm.chat("second", history=history, max_new_tokens=4, seed=7)
    assert "[seed] 7" in out
    assert f"Qwen: {first}" in out and f"Qwen: {second}" in out  # streamed text may end in spaces
    assert "max_new_tokens = 512" in out.split("[generation settings restored]")[1]


def test_clear_and_unknown_command_and_bad_conf(tiny_ckpt):
    out = run_chat(tiny_ckpt, ":clear\n:nope\n:conf top_q=1\n:seed x\n:help\n:q\n")
    assert "\033[2J" in out
    assert "unknown command ':nope'" in out
    assert "unknown generation setting(s): top_q" in out
    assert "seed must be an integer" in out
    assert ":clear-history" in out


class TerminalReader:
    """Reads a pseudo-terminal; each wait consumes output up to its needle and keeps the rest for the next."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def _read_until(self, done, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; got {self.buf[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:  # the program closed the terminal
                    raise AssertionError(f"terminal closed while waiting for {what}; got {self.buf[-500:]!r}")

    def wait_for(self, needle: bytes, timeout: float) -> bytes:
        self._read_until(lambda: needle in self.buf, repr(needle), timeout)
        cut = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:cut], self.buf[cut:]
        return seen

    def wait_for_bytes(self, n: int, timeout: float) -> None:
        """Until n bytes past the last needle have arrived (kept for the next wait)."""
        self._read_until(lambda: len(self.buf) >= n, f"{n} bytes", timeout)


def test_ctrl_c_stops_the_reply_not_the_program(tiny_ckpt):
    # The chat runs on a pseudo-terminal that is its controlling terminal (`setsid --ctty`), so the
    # Ctrl-C byte written to the terminal reaches it as SIGINT, exactly as a keypress would.
    # `env --default-signal=INT`: as an interactive shell starts it. A test run started in the background of a
    # non-interactive shell has SIGINT ignored, which every child inherits (Python then installs no
    # KeyboardInterrupt handler and Ctrl-C does nothing).
    # (subprocess forks in C: no Python runs in the child of this multi-threaded test process.)
    # Generous waits: a loaded 2-core machine loads the model and streams slowly; passing runs don't wait them out.
    master, slave = pty.openpty()
    proc = subprocess.Popen(["setsid", "--ctty", "env", "--default-signal=INT", *QWENLM, "chat", "--model",
                             str(tiny_ckpt), "--device", "cpu"], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    term = TerminalReader(master)
    try:
        term.wait_for(b"User> ", 300)
        os.write(master, b":conf max_new_tokens=100000\n")  # the reply runs until interrupted
        term.wait_for(b"User> ", 120)
        os.write(master, b"tell me everything\n")
        term.wait_for(b"Qwen: ", 120)
        term.wait_for_bytes(40, 120)  # the reply is being written
        os.write(master, b"\x03")  # Ctrl-C from the terminal
        assert b"User> " not in term.wait_for(b"[generation interrupted]", 120)
        term.wait_for(b"User> ", 120)
        os.write(master, b":his\n")
        term.wait_for(b"[history is empty]", 120)  # the interrupted turn is not kept
        os.write(master, b":exit\n")
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        os.close(master)


def test_generate_one_shot_and_errors(tiny_ckpt, llm):
    proc = subprocess.run(QWENLM + ["generate", "--model", str(tiny_ckpt), "--device", "cpu", "--max-new-tokens", "5",
                                    "--temperature", "0", "Hello"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == llm.generate("Hello", max_new_tokens=5, temperature=0) + "\n"
    proc = subprocess.run(QWENLM + ["generate", "--model", "/no/such/dir", "x"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "/no/such/dir: no such checkpoint folder" in proc.stderr
    proc = subprocess.run(QWENLM + ["generate", "--model", str(tiny_ckpt), "--dtype", "int3", "x"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "dtype 'int3'" in proc.stderr


def test_make_tiny_writes_a_loadable_official_folder(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(QWENLM + ["make-tiny", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "qwen.tiktoken", "tokenizer_config.json"]
    assert qwenlm.load(str(out), device="cpu", progress=False).chat("hi", max_new_tokens=2)[1][0][0] == "hi"


def test_make_tiny_refuses_a_folder_with_files_unless_forced(tmp_path):
    model = tmp_path / "Qwen-7B-Chat"
    model.mkdir()
    (model / "config.json").write_text('{"real": "model"}')
    (model / "model.safetensors").write_bytes(b"real weights")
    proc = subprocess.run(QWENLM + ["make-tiny", str(model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{model}: folder is not empty" in proc.stderr and "--force" in proc.stderr
    assert (model / "config.json").read_text() == '{"real": "model"}'
    assert (model / "model.safetensors").read_bytes() == b"real weights"
    assert cli.main(["make-tiny", str(model), "--force"]) == 0
    assert '"real"' not in (model / "config.json").read_text()
    assert not [p for p in model.iterdir() if ".tmp-" in p.name]  # written under temporary names, renamed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["make-tiny", str(empty)]) == 0


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, mask):
    from qwenlm.testing import make_tiny_checkpoint
    old = os.umask(mask)
    try:
        out = make_tiny_checkpoint(tmp_path / "tiny", layout="sharded")
        make_tiny_checkpoint(tmp_path / "bin", layout="bin")
    finally:
        os.umask(old)
    files = list(out.iterdir()) + list((tmp_path / "bin").iterdir())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}


def test_serve_names_a_dot_model_after_its_folder(tiny_ckpt):
    import httpx
    from qwenlm.server.launch import free_port
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(qwenlm.__file__).parents[1])}
    proc = subprocess.Popen(QWENLM + ["serve", "--model", ".", "--device", "cpu", "--port", str(port)], cwd=tiny_ckpt,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "qwenlm serve did not come up in 120 s"
                time.sleep(0.2)
        assert [m["id"] for m in models.json()["data"]] == [tiny_ckpt.name]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
