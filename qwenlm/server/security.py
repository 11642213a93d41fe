"""Who may call the server: the API key, the Host header (DNS rebinding) and the Origin of browser requests.

Plain ASGI middlewares (no response wrapping), so streamed responses and disconnects pass straight through.
A page on another site can make a browser send "simple" requests (form-like POSTs that need no CORS
preflight) to a server on localhost or a private network; with no key those would run. So a request whose
`Origin` is neither this server's own nor an allowed one is refused (403), and JSON routes refuse other
content types (415, in api.py). A rebinding attack (a hostile name resolving to 127.0.0.1) is refused by
the Host check.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from qwenlm.server.protocol import ApiError

OPEN_PATHS = {"/health", "/", "/favicon.ico"}  # the web chat page is static; it asks for the key itself
OPEN_PREFIXES = ("/static/",)
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hosts_to_allow(bind_host: str, extra: list[str] | None = None) -> list[str] | None:
    """Host header names accepted: on a loopback address only loopback names (and `extra`); elsewhere any
    name unless `extra` lists them. None means no check."""
    extra = [h.lower() for h in extra or []]
    if is_loopback(bind_host):
        return sorted(set(LOOPBACK_NAMES + [bind_host.lower()] + extra))
    return extra or None


def _host_name(host: str) -> str:
    """The name part of a Host header: "[::1]:8000" -> "::1", "example.com:80" -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _key_of(authorization: str) -> str | None:
    """The key in "Bearer KEY", or the password in "Basic base64(user:KEY)" (curl -u, browsers)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    """Every route but the open ones needs the key; compared in constant time. The challenge is Bearer, not
    Basic, so browsers show no login dialog of their own: the web chat asks for the key."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = _key_of(_header(scope, b"authorization") or "")
            if given is None or not hmac.compare_digest(given.encode(), self.key):
                err = ApiError(401, "Invalid or missing API key: send 'Authorization: Bearer KEY'.",
                               type="authentication_error", code="invalid_api_key")
                return await error_response(err, {"WWW-Authenticate": 'Bearer realm="qwenlm"'})(scope, receive, send)
        return await self.app(scope, receive, send)


class OriginHostMiddleware:
    """403 for a request whose Origin is present and is neither this server nor an allowed origin; 400 for a
    Host header outside `allowed_hosts` (None: any host)."""

    def __init__(self, app, allowed_origins: list[str] | None = None, allowed_hosts: list[str] | None = None):
        self.app = app
        self.any_origin = "*" in (allowed_origins or [])
        self.origins = {o.rstrip("/").lower() for o in allowed_origins or []}
        self.hosts = None if allowed_hosts is None else {_host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host") or ""
        if self.hosts is not None and _host_name(host) not in self.hosts:
            err = ApiError(400, f"Host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))}; "
                                "see --allowed-hosts)", param="Host", code="invalid_host")
            return await error_response(err)(scope, receive, send)
        origin = _header(scope, b"origin")
        same_site = bool(host) and urlsplit(origin or "").netloc.lower() == host.lower()
        if origin is not None and not self.any_origin and origin.rstrip("/").lower() not in self.origins \
                and not same_site:
            err = ApiError(403, f"Origin {origin!r} is not allowed (see --allowed-origins)", param="Origin",
                           type="permission_error", code="origin_not_allowed")
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)
