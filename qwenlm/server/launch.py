"""Run the app under uvicorn: `GracefulServer` (stops in bounded time, streams end with a final event) and
`ServerThread` (a background thread on a free port, for notebooks, embedding and tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from qwenlm.sampling import ParamError

FINAL_EVENT_SECONDS = 5.0  # after the grace period: time for ended streams to write their last events


def check_listen_address(host: str, port: int) -> None:
    """Fail now, before a model loads for minutes, where the server could not listen on host:port:
    a port outside 0..65535 (0 picks a free one), a host that does not resolve, an address in use."""
    if not 0 <= port <= 65535:
        raise ParamError("port", f"port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ParamError("host", f"host {host!r} does not resolve to an address to listen on ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
        try:
            s.bind(addr)
        except OSError as e:
            raise ParamError("port", f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class GracefulServer(uvicorn.Server):
    """uvicorn's server; once told to stop (SIGTERM, SIGINT, `should_exit`) it stops accepting connections,
    lets running requests go on for `grace` seconds, then calls the app's `state.end_requests()`, which ends
    each one with a final event (streams: an error event and [DONE]; others: 503). uvicorn cancels whatever
    is still open FINAL_EVENT_SECONDS later, so the process always exits. `on_exit` (the engine's shutdown) runs
    last, before uvicorn re-raises the signal that stopped it (which ends the process at once)."""

    def __init__(self, config: uvicorn.Config, grace: float = 10.0, on_exit=None):
        config.timeout_graceful_shutdown = grace + FINAL_EVENT_SECONDS
        super().__init__(config)
        self.grace, self.on_exit = grace, on_exit

    async def shutdown(self, sockets=None):
        end = getattr(getattr(self.config.app, "state", None), "end_requests", None)
        if end is not None:
            asyncio.get_running_loop().call_later(self.grace, end)
        try:
            await super().shutdown(sockets)
        finally:
            if self.on_exit is not None:
                await asyncio.to_thread(self.on_exit)


class ServerThread:
    """`with ServerThread(app) as srv: ... srv.url ...` serves `app` until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 grace: float = 2.0):
        self.host, self.port = host, port or free_port(host)
        self.server = GracefulServer(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level),
                                     grace=grace)
        self.thread = threading.Thread(target=self.server.run, name="qwenlm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.server.grace + FINAL_EVENT_SECONDS + 5)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
