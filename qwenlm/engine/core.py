"""The engine-core process: owns the model and the LLMEngine, loops on `step()`, talks to the API process
over ZMQ (core_client.py is the other end; wire.py the messages; docs/serving.md the design).

Why a process of its own: the engine's host work (scheduling, launching the next step, reading tokens,
detokenizing) must never wait behind the HTTP server's Python work (JSON, SSE, one object per token per
stream), and in one process both share one GIL. Here the core does only engine work, and each step's
outputs leave in one message.

`build_engine(spec)` is the one place the core's engine is made. With tensor_parallel_size N > 1 the core is
rank 0 of a tensor-parallel engine (engine/tp_workers.py): loading the model spawns the N - 1 worker processes,
this loop runs the scheduler once and sends each step on to them. A worker that dies ends the core (a Fatal naming
the rank, then exit 1), so the API process fails the running requests with a 503 rather than wait on them; every
way the core ends (shut down, terminated, its parent gone, a failure) stops its workers first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from qwenlm.engine import compile_cache
from qwenlm.engine.config import EngineConfig
from qwenlm.engine.engine import LLMEngine
from qwenlm.engine.tp_workers import TPWorkerError
from qwenlm.engine.wire import Abort, Add, Failure, Fatal, OutputPacker, Ready, Shutdown, StepOut, StopAll, \
    command_decoder, event_encoder

log = logging.getLogger("qwenlm.engine")
IDLE_POLL_MS = 500  # an idle core wakes this often to see whether its parent is still there
PROGRESS_SECONDS = 15.0  # while the engine builds, a line this often says it is still at work


@dataclass
class CheckpointFactory:
    """Loads a checkpoint folder into the process that calls it (plain fields: picklable to the core)."""
    folder: str
    device: str | None = None
    dtype: str | None = "auto"
    quantize: str | None = None
    adapter: str | None = None  # a PEFT LoRA folder merged into the weights after loading
    tensor_parallel_size: int = 1  # N > 1: this process holds rank 0's slice and starts the N - 1 other ranks

    def __call__(self):
        from qwenlm.loading import load_checkpoint
        ckpt = load_checkpoint(self.folder, device=self.device, dtype=self.dtype, quantize=self.quantize,
                               adapter=self.adapter, tensor_parallel_size=self.tensor_parallel_size)
        return ckpt.model, ckpt.tokenizer


@dataclass
class CoreSpec:
    """What the core process builds: `model_factory()` -> (model, tokenizer), picklable (a module-level
    function, a functools.partial of one, or a CheckpointFactory), run in the core; and the engine config."""
    model_factory: Callable
    engine_config: EngineConfig = dataclasses.field(default_factory=EngineConfig)


class _Ticker:
    """Logs `what` every PROGRESS_SECONDS until stopped, so a long phase never looks hung."""

    def __init__(self, what: str):
        self.what, self.start, self.stop = what, time.monotonic(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.wait(PROGRESS_SECONDS):
            log.info("still %s (%.0f s)", self.what, time.monotonic() - self.start)


def build_engine(spec: CoreSpec) -> LLMEngine:
    """Load the model and build its engine, logging each phase; compiled kernels come from and go to the
    on-disk cache (compile_cache.py) when the engine compiles."""
    t0 = time.monotonic()
    log.info("loading the model")
    model, tokenizer = spec.model_factory()
    t1 = time.monotonic()
    log.info("model loaded in %.1f s", t1 - t0)
    config = spec.engine_config
    on_cuda = next(model.parameters()).device.type == "cuda"
    key = compile_cache.cache_key(model, config) if config.use_compiled_decode(on_cuda) else None
    cached = compile_cache.load(key) if key else False
    log.info("building the engine")
    ticker = _Ticker("building the engine")
    try:
        engine = LLMEngine(model, tokenizer, config)
    finally:
        ticker.stop.set()
    if key and not cached:
        compile_cache.save(key)
    log.info("engine built in %.1f s (%d KV blocks of %d tokens); ready %.1f s after the start",
             time.monotonic() - t1, engine.blocks.num_blocks, config.block_size, time.monotonic() - t0)
    return engine


class EngineCore:
    """The loop: apply the commands that came in, run one step while there is work, send what it made."""

    def __init__(self, engine: LLMEngine, commands: zmq.Socket, events: zmq.Socket, parent_pid: int):
        self.engine, self.commands, self.events, self.parent_pid = engine, commands, events, parent_pid
        self.packer = OutputPacker()
        self.live: set[str] = set()  # requests added and not yet finished
        self.outputs, self.failures = [], []
        self.stop_reason: str | None = None  # set by SIGTERM
        self.tp_workers = getattr(engine.model, "tp_workers", None)  # a tensor-parallel engine's other ranks

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        while True:
            busy = self.engine.has_unfinished()
            changed = False
            if poller.poll(0 if busy else IDLE_POLL_MS):
                while True:
                    try:
                        command = command_decoder.decode(self.commands.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    changed = True
                    if isinstance(command, Shutdown):
                        return self._end("the engine is shut down")
                    self._apply(command)
            if os.getppid() != self.parent_pid:  # the API process is gone: nobody to serve, free the GPU
                log.warning("the API process is gone; the engine exits")
                return
            if self.stop_reason:
                return self._end(self.stop_reason)
            if self.tp_workers is not None:  # a rank that died while idle: fail now, not at the next request
                self.tp_workers.check()
            if self.engine.has_unfinished():
                self._step()
                changed = True
            if changed:
                self._flush()

    def _apply(self, command) -> None:
        if isinstance(command, Add):
            try:
                self.engine.add(self.engine.make_request(command.prompt_token_ids, command.params, command.request_id))
                self.live.add(command.request_id)
            except Exception as e:  # only this request fails
                self.failures.append(Failure(command.request_id, f"the request could not be added: {e}"))
        elif isinstance(command, Abort):
            out = self.engine.abort(command.request_id)
            if out is not None:
                self._emit(out)
        elif isinstance(command, StopAll):
            self._end_all(command.reason, stopped=True)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except TPWorkerError:  # a rank is gone: this engine cannot step again, so the core ends (run_core)
            raise
        except Exception as e:  # a failed step fails the requests in the engine rather than hanging them
            log.exception("engine step failed")
            self._end_all(f"engine step failed: {type(e).__name__}: {e}", stopped=False)
            return
        for out in outputs:
            self._emit(out)

    def _emit(self, out) -> None:
        self.outputs.append(self.packer.pack(out))
        if out.finished:
            self.live.discard(out.request_id)

    def _end_all(self, message: str, stopped: bool) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        for rid in self.live:
            self.packer.forget(rid)
            self.failures.append(Failure(rid, message, stopped))
        self.live.clear()

    def _end(self, reason: str) -> None:
        self._end_all(reason, stopped=True)
        self._flush()

    def _flush(self) -> None:
        """One message for everything since the last: the step's outputs, failures, and the stats."""
        self.events.send(event_encoder.encode(StepOut(self.outputs, self.failures, self.engine.stats())),
                         copy=False)
        self.outputs, self.failures = [], []


def log_to_stderr(name: str) -> None:
    """Progress and errors of the `qwenlm` loggers on stderr, each line tagged with the process's `name`."""
    logger = logging.getLogger("qwenlm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name}: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main() -> None:
    """The engine process's entry point, started by core_client.EngineClient with its arguments pickled on stdin.
    (Not multiprocessing's spawn: that re-runs the parent's main script in the child, which breaks scripts
    without an `if __name__ == "__main__"` guard.)"""
    sys_path, spec, commands_addr, events_addr, parent_pid = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = sys_path  # first: then the spec's factory resolves as it does in the parent
    run_core(pickle.loads(spec), commands_addr, events_addr, parent_pid)


def run_core(spec: CoreSpec, commands_addr: str, events_addr: str, parent_pid: int) -> None:
    """The core process's loop on `spec`'s engine."""
    # Ctrl-C reaches the whole process group; the API process decides when the engine stops (after its grace
    # period), so the core ignores it. SIGTERM sent to the core alone ends its requests and the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_to_stderr("qwenlm engine")
    ctx = zmq.Context()
    commands, events = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader; the reader drains every message
    events.setsockopt(zmq.LINGER, 5000)  # the last message (failures, Fatal) still goes out at exit
    commands.connect(commands_addr)
    events.connect(events_addr)
    try:
        engine = build_engine(spec)
    except BaseException as e:
        log.exception("the engine could not be built")
        events.send(event_encoder.encode(Fatal(f"the engine could not be built: {type(e).__name__}: {e}")))
        events.close()
        ctx.term()
        sys.exit(1)
    events.send(event_encoder.encode(Ready(engine.max_model_len, engine.model.config.vocab_size, engine.stats())))
    core = EngineCore(engine, commands, events, parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: setattr(core, "stop_reason", "the engine process was terminated"))
    try:
        core.run()
    except TPWorkerError as e:  # the message names the rank and how it ended; no traceback of ours adds to it
        log.error("%s", e)
        events.send(event_encoder.encode(Fatal(str(e))))
        sys.exit(1)
    except BaseException as e:
        log.exception("the engine loop failed")
        events.send(event_encoder.encode(Fatal(f"the engine loop failed: {type(e).__name__}: {e}")))
        raise
    finally:
        engine.shutdown()  # a tensor-parallel engine's workers stop now (after a failure: they are gone already)
        events.close()
        commands.close(linger=0)
        ctx.term()
