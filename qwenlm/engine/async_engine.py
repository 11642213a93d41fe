"""AsyncEngine: the LLMEngine driven by a background thread, streamed to asyncio consumers.

The engine thread owns the engine: it applies queued adds and aborts between steps and runs `step()`
while there is work. Outputs go to each request's asyncio.Queue through its event loop's
`call_soon_threadsafe`, so the event loop never waits on a GPU step. A consumer that stops iterating
(break, cancellation, disconnect) aborts its request, which frees its blocks at the next step boundary.

The same interface (make_request, stream, abort_nowait, stop_all, stats, failure, max_model_len,
shutdown) is served by core_client.EngineClient, which runs the engine in a process of its own (`qwenlm
serve`); this one is for an app around a model already loaded in this process (notebooks, tests).

A request that fails (its add, its detokenizing or stop handling) raises RequestError to its own consumer
only; a step that fails as a whole fails the requests then in the engine. `stop_all` and `shutdown` end
every open stream with EngineStopped, so no consumer is ever left waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import uuid

from qwenlm.engine.engine import LLMEngine, Request
from qwenlm.engine.outputs import EngineStopped, RequestError, RequestOutput
from qwenlm.sampling import SamplingParams


async def queued_outputs(q: asyncio.Queue, on_leave):
    """A request's RequestOutputs from its queue until it finishes; raises the RequestError put there (or the one
    its output reports). A consumer that stops before the end calls `on_leave()` (which aborts the request).

    A consumer that fell behind (several steps' outputs queued) gets them as one output: the latest (running
    totals) with the text deltas joined. Under load the server then writes one event per stream per wake-up
    rather than one per step it missed, and catches up instead of falling further behind."""
    finished = False
    held = None  # an error met while merging: raised after the outputs before it
    try:
        while True:
            item, held = (held, None) if held is not None else (await q.get(), None)
            if isinstance(item, RequestError):
                finished = True
                raise item
            while not item.finished and not q.empty():
                later = q.get_nowait()
                if isinstance(later, RequestError):
                    held = later
                    break
                item = _merged(item, later)
            finished = item.finished
            if item.error is not None:
                raise RequestError(item.error)
            yield item
            if finished:
                return
    finally:
        if not finished:
            on_leave()


def _merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`later` (whose totals include `earlier`'s) with each sample's text delta covering both steps."""
    deltas = {c.index: c.text_delta for c in earlier.outputs}
    outs = [dataclasses.replace(c, text_delta=deltas.get(c.index, "") + c.text_delta) for c in later.outputs]
    return dataclasses.replace(later, outputs=outs)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # registering a stream vs. the final sweep at shutdown
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qwenlm-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            while not self._commands.empty():
                self._apply(*self._commands.get())
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails the requests in the engine rather than hanging them
                self._error = e
                self._end_all(RequestError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for out in outputs:
                self._deliver(out)
        with self._lock:  # after this no stream can register (they check _closed under the lock)
            self._end_all(EngineStopped("the engine is shut down"))

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            try:
                self.engine.add(arg)
            except Exception as e:  # only this request fails
                self._deliver_to(arg.request_id, RequestError(f"the request could not be added: {e}"))
                self._streams.pop(arg.request_id, None)
        elif kind == "abort":
            out = self.engine.abort(arg)
            if out is not None:
                self._deliver(out)
        else:  # "stop_all"
            self._end_all(EngineStopped(arg))

    def _end_all(self, error: RequestError) -> None:
        """Abort every request and hand `error` to every open stream."""
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        for rid in list(self._streams):  # not clear(): a stream may register meanwhile, its add still queued
            self._deliver_to(rid, error)
            self._streams.pop(rid, None)

    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_to(out.request_id, out)
        if out.finished:
            self._streams.pop(out.request_id, None)

    def _deliver_to(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                self._streams.pop(request_id, None)

    # ---- the asyncio side -------------------------------------------------------------------------
    def make_request(self, prompt: list[int] | str, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Tokenize and validate now (ValueError for a request that can never run), to `stream` later."""
        return self.engine.make_request(prompt, params, request_id or uuid.uuid4().hex)

    async def generate(self, prompt: list[int] | str, params: SamplingParams | None = None,
                       request_id: str | None = None):
        """Yield RequestOutputs (text_delta holds each step's new text) until the request finishes."""
        async with contextlib.aclosing(self.stream(self.make_request(prompt, params, request_id))) as outs:
            async for out in outs:  # aclosing: a consumer that leaves aborts the request now, not at GC
                yield out

    async def stream(self, req: Request):
        """Run a request made by `make_request`; yield its RequestOutputs. Raises RequestError if it fails
        (EngineStopped when the engine is shut down or told to stop every request)."""
        request_id = req.request_id
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed:
                raise EngineStopped("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already streaming")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", req))
        self._wake.set()
        async with contextlib.aclosing(queued_outputs(q, lambda: self._leave(request_id))) as outs:
            async for out in outs:
                yield out

    def _leave(self, request_id: str) -> None:
        """The consumer went away before the end: free the request's blocks."""
        self._streams.pop(request_id, None)
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort from any thread; takes effect at the next step boundary (a stream gets a final "abort")."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def stop_all(self, reason: str = "the server is shutting down") -> None:
        """End every running request from any thread: their streams raise EngineStopped(reason)."""
        self._commands.put(("stop_all", reason))
        self._wake.set()

    def stats(self) -> dict:
        return self.engine.stats()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (its thread is gone), or None; core_client.EngineClient says the same."""
        if not self._closed and not self._thread.is_alive():
            return f"the engine thread stopped: {self._error or 'unknown cause'}"
        return None

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
