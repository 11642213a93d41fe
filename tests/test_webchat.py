"""The web chat at / in headless Chromium (Debian's package, driven by Playwright): streamed Markdown
replies, stop, new chat, multi-turn history, settings. A missing Chromium fails here; it is never skipped."""

import os
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread
from server_helpers import RecordingEngine

CHROMIUM = os.environ.get("QWENLM_CHROMIUM", "/usr/bin/chromium")
KEY = "web-key"


@pytest.fixture(scope="module")
def web(tiny_ckpt):
    assert os.path.exists(CHROMIUM), f"Chromium not found at {CHROMIUM}: apt-get install -y chromium"
    engine = RecordingEngine(AsyncEngine(LLM(tiny_ckpt, device="cpu")))
    app = create_app(engine, engine.engine.tokenizer, "tiny", api_key=KEY)
    with ServerThread(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        # the page's own requests carry the key the browser was given for the site (HTTP Basic)
        context = browser.new_context(http_credentials={"username": "user", "password": KEY})
        page = context.new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # replies stream slowly on a loaded machine (expect's default: 5 s)
        page.goto(srv.url + "/")
        expect(page.locator("#model-name")).to_have_text("tiny")
        expect(page.locator("#settings")).to_be_hidden()  # folded away until asked for
        srv.page, srv.engine = page, engine
        yield srv
        browser.close()
    engine.inner.shutdown()


def wait_idle(engine, timeout=60.0):  # generous for a loaded machine; an idle engine returns at once
    core = engine.engine
    deadline = time.monotonic() + timeout
    while core.requests or core.blocks.num_free_blocks != core.blocks.num_blocks:
        assert time.monotonic() < deadline, "the stopped reply is still running in the engine"
        time.sleep(0.05)


def settings(page, **values):
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
        expect(page.locator("#settings")).to_be_visible()
    for key, value in values.items():
        page.fill(f"#{key}", str(value))


def test_chat_stop_and_new_chat(web):
    page, tok = web.page, web.engine.engine.tokenizer
    settings(page, system="Be brief.", max_tokens=8, temperature=0)
    page.fill("#input", "Hello **there**")
    page.press("#input", "Enter")
    first = page.locator(".msg.assistant").nth(0)
    expect(first).to_have_attribute("data-done", "true")
    assert first.inner_text().strip()  # the streamed reply is on the page
    expect(page.locator(".msg.user").nth(0)).to_have_text("Hello **there**")  # user text is never rendered
    prompt, params, _ = web.engine.calls[-1]
    assert "Be brief." in tok.decode(prompt) and params.max_tokens == 8 and params.temperature == 0

    page.fill("#input", "And again?")
    page.click("#send")
    expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-done", "true")
    text = tok.decode(web.engine.calls[-1][0])
    assert "Hello **there**" in text and "And again?" in text  # multi-turn history is sent

    settings(page, max_tokens=5000)
    page.fill("#input", "A very long answer please")
    page.click("#send")
    streaming = page.locator(".msg.assistant.streaming")
    expect(streaming).to_have_count(1)
    expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("document.querySelector('.msg.assistant.streaming').textContent.length > 20")
    page.click("#stop")
    expect(streaming).to_have_count(0)
    expect(page.locator("#send")).to_be_enabled()
    wait_idle(web.engine)  # stopping in the page aborted the request in the engine

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    settings(page, max_tokens=4)
    page.fill("#input", "Fresh start")
    page.click("#send")
    expect(page.locator(".msg.assistant").nth(0)).to_have_attribute("data-done", "true")
    text = tok.decode(web.engine.calls[-1][0])
    assert "Fresh start" in text and "And again?" not in text  # the new chat has no old history


def test_markdown_renderer_is_safe(web):
    html = web.page.evaluate("""renderMarkdown(
        "# Title\\n\\nSome **bold** and `x<y` code\\n\\n- one\\n- two\\n\\n```python\\nprint('<b>hi</b>')\\n```\\n"
        + "<script>alert(1)</script> <img src=x onerror=alert(1)>")""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code class="language-python">print(&#39;&lt;b&gt;hi&lt;/b&gt;&#39;)</code></pre>' in html
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
