"""Shared by the server tests: the real AsyncEngine, wrapped to record what the server sends it."""

import contextlib

from qwenlm.engine import AsyncEngine


class RecordingEngine:
    """The real AsyncEngine, recording each request as [prompt_ids, params, final RequestOutput or None]."""

    def __init__(self, engine: AsyncEngine):
        self.inner, self.engine = engine, engine.engine
        self.calls = []

    def make_request(self, prompt_ids, params, request_id):
        return self.inner.make_request(prompt_ids, params, request_id)

    async def stream(self, req):
        call = [list(req.prompt_token_ids), req.params, None]
        self.calls.append(call)
        async with contextlib.aclosing(self.inner.stream(req)) as outs:
            async for out in outs:
                call[2] = out
                yield out

    def abort_nowait(self, request_id):
        self.inner.abort_nowait(request_id)

    def stop_all(self, reason):
        self.inner.stop_all(reason)

    def stats(self):
        return self.inner.stats()
