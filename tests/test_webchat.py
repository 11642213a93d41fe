"""The web chat at / in headless Chromium (Debian's package, driven by Playwright): the key prompt, streamed
Markdown replies that the view follows, stop, new chat, multi-turn history without failed turns, settings.
A missing Chromium fails here; it is never skipped."""

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
        context = browser.new_context(viewport={"width": 900, "height": 500})
        page = context.new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # replies stream slowly on a loaded machine (expect's default: 5 s)
        page.goto(srv.url + "/")  # the page itself needs no key: it asks for one
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


def enter_key(page, key=KEY):
    expect(page.locator("#key-prompt")).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-save")


def settings(page, **values):
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
        expect(page.locator("#settings")).to_be_visible()
    for key, value in values.items():
        page.fill(f"#{key}", str(value))


def test_key_prompt_keeps_only_a_key_that_works(web):
    page = web.page
    expect(page.locator("#key-message")).to_contain_text("needs an API key")
    enter_key(page, "wrong")
    expect(page.locator("#key-message")).to_contain_text("refused")
    enter_key(page)
    expect(page.locator("#key-prompt")).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text("tiny")
    assert page.evaluate("localStorage.getItem('qwenlm.api_key')") == KEY
    settings(page, api_key="typo")  # a wrong key typed in Settings does not break the working session
    page.locator("#api_key").dispatch_event("change")
    expect(page.locator("#error")).to_contain_text("previous key is kept")
    expect(page.locator("#api_key")).to_have_value(KEY)
    assert page.evaluate("localStorage.getItem('qwenlm.api_key')") == KEY
    page.reload()  # the kept key is used at once
    expect(page.locator("#model-name")).to_have_text("tiny")
    expect(page.locator("#key-prompt")).to_be_hidden()


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


def test_failed_sends_leave_no_trace(web):
    page, tok = web.page, web.engine.engine.tokenizer
    page.click("#new-chat")
    settings(page, max_tokens=4, temperature=5)  # out of range: the server answers 400
    page.fill("#input", "Refused question")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("temperature")
    expect(page.locator(".msg")).to_have_count(0)  # neither the question nor an empty reply stays
    expect(page.locator("#input")).to_have_value("Refused question")  # back in the box to retry

    page.evaluate("localStorage.setItem('qwenlm.api_key', 'stale'); location.reload()")  # a key gone stale
    enter_key_later = page.locator("#key-prompt")
    expect(enter_key_later).to_be_visible()
    settings(page, temperature=0)
    page.fill("#input", "Asked without a key")
    page.click("#send")  # 401: the prompt asks for the key, and the message is sent once it works
    expect(page.locator(".msg")).to_have_count(0)
    enter_key(page)
    expect(page.locator(".msg.assistant").nth(0)).to_have_attribute("data-done", "true")
    page.fill("#input", "Next question")
    page.click("#send")
    expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-done", "true")
    sent = tok.decode(web.engine.calls[-1][0])
    assert "Asked without a key" in sent and "Next question" in sent and "Refused question" not in sent
    assert sent.count("<|im_start|>assistant") == 2  # one earlier turn, no empty failed reply


def test_the_view_follows_a_streamed_reply_until_scrolled_up(web):
    page = web.page
    page.click("#new-chat")
    settings(page, max_tokens=2000, temperature=0)
    page.click("#toggle-settings")
    page.set_viewport_size({"width": 360, "height": 400})  # narrow: the reply soon outgrows the view
    page.fill("#input", "Write a long story")
    page.click("#send")
    page.wait_for_function("document.documentElement.scrollHeight > 2 * window.innerHeight")
    assert page.evaluate("atBottom() && window.scrollY > 0")  # followed the reply as it grew
    page.evaluate("window.scrollTo(0, 0)")
    height = page.evaluate("document.documentElement.scrollHeight")
    page.wait_for_function(f"document.documentElement.scrollHeight > {height} + 100")
    assert page.evaluate("window.scrollY") == 0  # the reader scrolled up: the view stays put
    page.click("#stop")
    wait_idle(web.engine)
    page.set_viewport_size({"width": 900, "height": 500})
