"""EngineClient: the LLMEngine in a process of its own (core.py), behind AsyncEngine's interface.

The server's handlers call `make_request`, `stream`, `abort_nowait`, `stop_all`, `stats` and `shutdown` on
either this or the in-process AsyncEngine (async_engine.py, for an app built around a model already loaded
in a notebook or a test); both also say `failure` (None while the engine works) and `max_model_len`.

Requests are validated and tokenized here, in the API process, so a bad one is a 400 before it reaches the
engine. Commands go to the core over a ZMQ PUSH socket; one thread receives the core's messages (one per
step), puts the outputs' running totals back (wire.py) and hands each event loop its streams' items in one
`call_soon_threadsafe`. The same thread watches the core process: if it dies, every open stream fails with
EngineDead, new requests are refused (503) and `failure` says why, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable

import zmq

from qwenlm.engine.async_engine import queued_outputs
from qwenlm.engine.core import CoreSpec
from qwenlm.engine.engine import Request, checked_prompt_ids
from qwenlm.engine.outputs import EngineStopped, RequestError
from qwenlm.engine.sampler import sampling_rows
from qwenlm.engine.sequence import Sequence
from qwenlm.engine.wire import Abort, Add, Fatal, OutputUnpacker, Ready, Shutdown, StepOut, StopAll, \
    command_encoder, event_decoder
from qwenlm.sampling import SamplingParams

log = logging.getLogger("qwenlm.engine")
SHUTDOWN_SECONDS = 30.0  # for the core to end its requests and exit before it is terminated


class EngineStartError(RuntimeError):
    """The engine process could not be built (the message says why; its log has the details)."""


class EngineDead(EngineStopped):
    """The engine process is gone: running requests failed, new ones are refused until a restart."""


class EngineClient:
    def __init__(self, spec: CoreSpec, tokenizer=None):
        self.tokenizer = tokenizer
        self._closed = False
        self._failure: str | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # the stream table; and sends (a ZMQ socket is not thread-safe)
        self._unpacker = OutputUnpacker()
        self._dir = tempfile.mkdtemp(prefix="qwenlm-engine-")  # the two IPC sockets, readable by us only
        self._ctx = zmq.Context()
        self._commands, self._events = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # a send never blocks the event loop
        self._commands.setsockopt(zmq.LINGER, 0)
        commands_addr, events_addr = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events"
        self._commands.bind(commands_addr)
        self._events.bind(events_addr)
        # A fresh interpreter, not fork: CUDA cannot be used in a forked child, and the core should not inherit
        # the server. Its arguments go pickled on stdin (core.main); stdout and stderr are ours.
        self.process = subprocess.Popen([sys.executable, "-c", "from qwenlm.engine.core import main; main()"],
                                        stdin=subprocess.PIPE)
        atexit.register(self.shutdown)  # a client never shut down must not leave the core (and the GPU) behind
        self.process.stdin.write(pickle.dumps((sys.path, pickle.dumps(spec), commands_addr, events_addr, os.getpid())))
        self.process.stdin.close()
        self._exited = os.pidfd_open(self.process.pid)  # readable once the process has exited (Linux 5.3+)
        log.info("engine process started (pid %d)", self.process.pid)
        try:
            ready = self._wait_ready()
        except BaseException:  # Ctrl-C while loading (the core ignores it), or the build failed
            self.process.terminate()  # it reads no commands while it builds
            self.shutdown()
            raise
        self.max_model_len, self.vocab_size = ready.max_model_len, ready.vocab_size
        self._stats = ready.stats
        self._thread = threading.Thread(target=self._receive, name="qwenlm-engine-client", daemon=True)
        self._thread.start()

    # ---- the core's messages ----------------------------------------------------------------------
    def _wait_ready(self) -> Ready:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._exited, zmq.POLLIN)
        while True:  # no time limit: a first start may compile for minutes (the core logs its progress)
            ready = dict(poller.poll(1000))
            if self._events in ready:
                event = event_decoder.decode(self._events.recv())
                if isinstance(event, Ready):
                    return event
                if isinstance(event, Fatal):
                    raise EngineStartError(event.message)
            elif self._exited in ready:
                raise EngineStartError(f"the engine process exited with code {self.process.wait()} before it was "
                                   "ready; its log above says why")

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._exited, zmq.POLLIN)
        while not self._closed:
            ready = dict(poller.poll(200))
            if self._events in ready or self._exited in ready:
                while True:  # everything the core sent, also its last words before dying
                    try:
                        event = event_decoder.decode(self._events.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if isinstance(event, StepOut):
                        self._dispatch(event)
                    elif isinstance(event, Fatal):
                        self._died(event.message)
            if self._exited in ready:
                self._died(f"the engine process exited unexpectedly (exit code {self.process.wait()})")
                return

    def _dispatch(self, event: StepOut) -> None:
        self._stats = event.stats
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in event.outputs:
                entry = self._streams.get(out.request_id)
                out = self._unpacker.unpack(out)  # also for a gone stream: its totals stay right
                if entry is not None:
                    batches.setdefault(entry[0], []).append((entry[1], out))
                    if out.finished:
                        del self._streams[out.request_id]
            for f in event.failures:
                self._unpacker.forget(f.request_id)
                entry = self._streams.pop(f.request_id, None)
                if entry is not None:
                    error = EngineStopped(f.message) if f.stopped else RequestError(f.message)
                    batches.setdefault(entry[0], []).append((entry[1], error))
        self._hand_over(batches)

    def _died(self, reason: str) -> None:
        if self._closed or self._failure is not None:  # the first reason stands (the core's Fatal says most)
            return
        with self._lock:
            self._failure = reason  # from here on `stream` refuses new requests
        failed = self._end_streams(lambda: EngineDead(reason))
        log.error("%s: %d running request(s) failed; new requests get 503 until the server is restarted",
                  reason, failed)

    def _end_streams(self, error: Callable[[], Exception]) -> int:
        """End every open stream with its own `error()`; returns how many there were."""
        with self._lock:
            streams, self._streams = self._streams, {}
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, q in streams.values():
            batches.setdefault(loop, []).append((q, error()))
        self._hand_over(batches)
        return len(streams)

    @staticmethod
    def _hand_over(batches: dict) -> None:
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def _send(self, command) -> None:
        with self._lock:
            if self._closed:
                return
            try:  # never blocks: a PUSH socket with no peer (the core died) would wait forever
                self._commands.send(command_encoder.encode(command), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the core is gone; the receiving thread reports it

    # ---- the asyncio side (AsyncEngine's interface) -----------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (it died), or None."""
        if self._failure is None and not self._closed and self.process.poll() is not None:
            return f"the engine process exited (exit code {self.process.returncode})"
        return self._failure

    def make_request(self, prompt: list[int] | str, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate now (ValueError for a request that can never run), to `stream` later:
        the checks LLMEngine.make_request makes, here, so a bad request never reaches the engine."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = checked_prompt_ids(prompt, params, self.tokenizer, self.max_model_len, self.vocab_size)
        try:  # the engine builds every row of a step at once: a row that cannot be built fails here
            sampling_rows([Sequence(request_id, 0, prompt_ids, params, params.seed or 0, 1.0)])
        except Exception as e:
            raise ValueError(f"the sampling parameters of request {request_id!r} cannot be used: {e}") from e
        return Request(request_id, prompt_ids, params)

    async def generate(self, prompt: list[int] | str, params: SamplingParams | None = None,
                       request_id: str | None = None):
        """Yield RequestOutputs (text_delta holds each step's new text) until the request finishes."""
        async with contextlib.aclosing(self.stream(self.make_request(prompt, params, request_id))) as outs:
            async for out in outs:
                yield out

    async def stream(self, req: Request):
        """Run a request made by `make_request`; yield its RequestOutputs. Raises RequestError if it fails
        (EngineStopped when the engine is shut down or told to stop every request, EngineDead if it died)."""
        request_id = req.request_id
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._failure is not None:
                raise EngineDead(self._failure)
            if self._closed:
                raise EngineStopped("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already streaming")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._send(Add(request_id, req.prompt_token_ids, req.params))
        async with contextlib.aclosing(queued_outputs(q, lambda: self._leave(request_id))) as outs:
            async for out in outs:
                yield out

    def _leave(self, request_id: str) -> None:
        """The consumer went away before the end: free the request's blocks."""
        with self._lock:
            self._streams.pop(request_id, None)
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort from any thread; the core applies it before its next step."""
        self._send(Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def stop_all(self, reason: str = "the server is shutting down") -> None:
        """End every running request: their streams raise EngineStopped(reason)."""
        self._send(StopAll(reason))

    def stats(self) -> dict:
        """LLMEngine.stats() as of the core's last step."""
        return dict(self._stats)

    def shutdown(self) -> None:
        """Stop the core (it ends its requests first), then end any stream still open. Idempotent."""
        if self._closed:
            return
        self._send(Shutdown())
        with self._lock:
            self._closed = True
        try:
            self.process.wait(SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not exit in %.0f s; terminating it", SHUTDOWN_SECONDS)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        log.info("engine process stopped (exit code %s)", self.process.returncode)
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._end_streams(lambda: EngineStopped("the engine is shut down"))
        self._commands.close(linger=0)
        self._events.close(linger=0)
        self._ctx.term()
        os.close(self._exited)
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)
