"""`qwenlm chat`: an interactive terminal chat with the official demo's commands (spec §14)."""

from __future__ import annotations

import ast
import dataclasses
import sys
import time

from qwenlm.sampling import check_seed

HELP = """\
Commands:
  :help / :h                 show this help
  :exit / :quit / :q         leave
  :clear / :cl               clear the screen
  :clear-history / :clh      forget the conversation
  :history / :his            show the conversation
  :seed                      show the seed;  :seed N  set it
  :conf                      show generation settings;  :conf key=value ...  change them
  :reset-conf                restore the settings the chat started with
Ctrl-C stops the reply being written; at the prompt, Ctrl-C twice, Ctrl-D or :exit leaves."""

QUIT_WINDOW_S = 3.0  # a second Ctrl-C at the prompt within this many seconds leaves


class TerminalChat:
    def __init__(self, llm, system: str, seed: int = 1234, out=sys.stdout):
        self.llm = llm
        self.system = system
        self.seed = seed
        self.out = out
        self.history: list[tuple[str, str]] = []
        self.original_conf = llm.generation_config

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a ':' command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in (":exit", ":quit", ":q"):
            return False
        if name in (":help", ":h"):
            self.say(HELP)
        elif name in (":clear", ":cl"):
            self.say("\033[2J\033[H", end="")
        elif name in (":clear-history", ":clear-his", ":clh"):
            self.history = []
            self.say("[history cleared]")
        elif name in (":history", ":his"):
            for i, (q, r) in enumerate(self.history):
                self.say(f"User[{i}]: {q}\nQwen[{i}]: {r}")
            if not self.history:
                self.say("[history is empty]")
        elif name == ":seed":
            if arg:
                try:
                    self.seed = check_seed("seed", int(arg))
                except ValueError:
                    self.say(f"[error] seed must be an integer in [-2**63, 2**63 - 1], got {arg!r}")
                    return True
            self.say(f"[seed] {self.seed}")
        elif name == ":conf":
            if arg:
                self.set_conf(arg)
            for key, value in dataclasses.asdict(self.llm.generation_config).items():
                self.say(f"  {key} = {value!r}")
        elif name == ":reset-conf":
            self.llm.generation_config = self.original_conf
            self.say("[generation settings restored]")
        else:
            self.say(f"[error] unknown command {name!r}; :help lists them")
        return True

    def set_conf(self, arg: str) -> None:
        updates = {}
        for item in arg.split():
            key, sep, raw = item.partition("=")
            if not sep:
                self.say(f"[error] expected key=value, got {item!r}")
                return
            try:
                updates[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                updates[key] = raw  # a bare word such as chatml
        try:  # checked by the rules every setting goes through; nothing changes unless all are valid
            self.llm.generation_config = self.llm.generation_config.replace(**updates)
        except ValueError as e:
            self.say(f"[error] {e}; settings unchanged")

    def reply(self, query: str) -> None:
        self.say("Qwen: ", end="")
        parts: list[str] = []
        try:
            for delta in self.llm.chat_stream(query, self.history, self.system, seed=self.seed):
                parts.append(delta)
                self.say(delta, end="")
        except KeyboardInterrupt:
            self.say("\n[generation interrupted]")
            return
        except Exception as e:  # the conversation so far matters more than this turn: report and go on
            self.say(f"\n[error] {e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}")
            self.say("[this message was not answered; the conversation is kept]")
            return
        self.say()
        self.history.append((query, "".join(parts).strip()))

    def run(self, read=input, clock=time.monotonic) -> None:
        self.say("Welcome to Qwen chat. Type a message, :help for commands, :exit to leave.")
        interrupted_at = None
        while True:
            try:
                line = read("User> ")
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:  # a stray Ctrl-C must not throw the conversation away
                now = clock()
                if interrupted_at is not None and now - interrupted_at <= QUIT_WINDOW_S:
                    self.say()
                    return
                interrupted_at = now
                self.say(f"\n[press Ctrl-C again within {QUIT_WINDOW_S:g} s to leave, or type :exit]")
                continue
            interrupted_at = None
            if not line.strip():
                continue
            if line.startswith(":"):
                if not self.command(line):
                    return
                continue
            self.reply(line)
