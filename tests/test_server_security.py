"""Who may call the server: CORS only for allowed origins, 403 for other sites' pages, 415 for the form-like
bodies they can send without a preflight, Host names checked on loopback (DNS rebinding), no empty key."""

import httpx
import pytest

from qwenlm.cli import build_parser
from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from qwenlm.server.security import hosts_to_allow

MODEL = "tiny"
APP_ORIGIN = "https://app.example"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = AsyncEngine(LLM(tiny_ckpt, device="cpu"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    app = create_app(engine, engine.engine.tokenizer, MODEL, allowed_origins=[APP_ORIGIN],
                     allowed_hosts=hosts_to_allow("127.0.0.1"))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        srv.http = http
        yield srv


def test_allowed_origin_gets_cors_and_others_get_403(served):
    http = served.http
    pre = http.options("/v1/chat/completions", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == APP_ORIGIN
    r = http.post("/v1/chat/completions", json=BODY, headers={"Origin": APP_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    for origin in ("https://evil.example", "null", APP_ORIGIN + ".evil.example"):
        r = http.post("/v1/chat/completions", json=BODY, headers={"Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["param"] == "Origin"
        assert "access-control-allow-origin" not in r.headers
    r = http.post("/v1/chat/completions", json=BODY, headers={"Origin": served.url})  # the web chat's own page
    assert r.status_code == 200


def test_simple_cross_site_bodies_are_refused(served):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = served.http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                             headers={"Content-Type": ctype})
        assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
    r = served.http.post("/v1/chat/completions", json=BODY, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_names_are_checked_on_loopback(served):
    port = served.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert served.http.get("/health", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        r = served.http.get("/health", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Host", host
    assert hosts_to_allow("0.0.0.0") is None and hosts_to_allow("0.0.0.0", ["api.example"]) == ["api.example"]
    assert "proxy.local" in hosts_to_allow("::1", ["proxy.local"])


def test_no_cors_without_allowed_origins(engine):
    app = create_app(engine, engine.engine.tokenizer, MODEL)
    with ServerThread(app) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": APP_ORIGIN,
                                                                      "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/v1/chat/completions", json=BODY, headers={"Origin": APP_ORIGIN})
        assert r.status_code == 403


def test_empty_key_is_an_error_and_the_default_bind_is_loopback(engine):
    for key in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            create_app(engine, engine.engine.tokenizer, MODEL, api_key=key)
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
