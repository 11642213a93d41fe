"""Shared by the server tests: the real AsyncEngine, wrapped to record what the server sends it."""

from qwenlm.engine import AsyncEngine


class RecordingEngine:
    """The real AsyncEngine, recording each call as [prompt_ids, params, final RequestOutput or None]."""

    def __init__(self, engine: AsyncEngine):
        self.inner, self.engine = engine, engine.engine
        self.calls = []

    async def generate(self, prompt_ids, params, request_id):
        call = [list(prompt_ids), params, None]
        self.calls.append(call)
        async for out in self.inner.generate(prompt_ids, params, request_id):
            call[2] = out
            yield out

    def abort_nowait(self, request_id):
        self.inner.abort_nowait(request_id)

    def stats(self):
        return self.inner.stats()
