"""AsyncEngine: the LLMEngine driven by a background thread, streamed to asyncio consumers.

The engine thread owns the engine: it applies queued adds and aborts between steps and runs `step()`
while there is work. Outputs go to each request's asyncio.Queue through its event loop's
`call_soon_threadsafe`, so the event loop never waits on a GPU step. A consumer that stops iterating
(break, cancellation, disconnect) aborts its request, which frees its blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid

from qwenlm.engine.engine import LLMEngine
from qwenlm.engine.outputs import RequestOutput
from qwenlm.sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qwenlm-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            while not self._commands.empty():
                kind, arg = self._commands.get()
                if kind == "add":
                    self.engine.add(arg)
                else:
                    out = self.engine.abort(arg)
                    if out is not None:
                        self._deliver(out)
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # a failed step fails every open stream rather than hanging them
                self._error = e
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                for rid in list(self._streams):
                    self._deliver_to(rid, e)
                continue
            for out in outputs:
                self._deliver(out)

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
    async def generate(self, prompt: list[int] | str, params: SamplingParams | None = None,
                       request_id: str | None = None):
        """Yield RequestOutputs (text_delta holds each step's new text) until the request finishes."""
        if self._closed:
            raise RuntimeError("AsyncEngine is shut down")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        req = self.engine.make_request(prompt, params, request_id)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", req))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise RuntimeError(f"engine step failed: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away: free the request's blocks
                self._streams.pop(request_id, None)
                self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort from any thread; takes effect at the next step boundary (a stream gets a final "abort")."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
