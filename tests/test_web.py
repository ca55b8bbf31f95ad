"""The web chat page in a real headless Chromium (Playwright driving Debian's chromium), against a
live server with the golden tiny model. The screenshot lands in tests/artifacts/web_chat.png."""
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from chatglm_ft import load
from chatglm_ft.engine import Engine
from chatglm_ft.generate import GenerationConfig, generate
from chatglm_ft.prompt import clean_response
from chatglm_ft.server import create_app

from test_server import LiveServer

CHROMIUM = os.environ.get("CHATGLM_FT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"


def require_browser():
    """Under CI a missing browser is a failure (scripts/setup.sh installs it); elsewhere a skip."""
    problem = None
    if importlib.util.find_spec("playwright") is None:
        problem = "the playwright package is not installed (pip install playwright)"
    if problem is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        problem = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def web(golden_dir, tokenizer):
    model, _ = load(golden_dir, dtype="float32", device="cpu")
    engine = Engine(model, tokenizer, max_batch=4)
    with LiveServer(create_app(engine, model_name="chatglm-6b-tiny")) as server:
        yield server


@pytest.fixture(scope="module")
def page(web):
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def set_slider(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def wait_idle(page, messages: int) -> None:
    page.wait_for_function(f"document.body.dataset.state === 'idle' && document.querySelectorAll('.msg').length === {messages}")


def test_chat_page_streams_keeps_history_stops_and_clears(web, page, tiny):
    model, tokenizer = tiny
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(web.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'chatglm-6b-tiny'")
    set_slider(page, "#temperature", 0)  # greedy, so the answer is known
    set_slider(page, "#max-length", 48)
    assert page.inner_text("#temperature-value") == "0.00" and page.inner_text("#max-length-value") == "48"
    # watch the answer grow: each streamed chunk re-renders the bubble
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const b = document.querySelector('.msg.assistant:last-child .body');
            if (b) window.lengths.push(b.textContent.length); }).observe(document.getElementById('chat'),
            { childList: true, subtree: true, characterData: true }); }""")

    send(page, "你好")
    wait_idle(page, 2)
    expected = clean_response(generate(model, tokenizer, [tokenizer.encode("你好")], GenerationConfig(max_new_tokens=48))[0].text)
    assert page.evaluate("window.chatState.messages") == [{"role": "user", "content": "你好"},
                                                           {"role": "assistant", "content": expected}]
    assert len(set(page.evaluate("window.lengths")) - {0}) >= 3  # it arrived in pieces
    assert page.inner_text(".msg.user .body") == "你好"
    assert sent[-1]["stream"] is True and sent[-1]["temperature"] == 0 and sent[-1]["max_tokens"] == 48
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"))

    send(page, "Give three tips for staying healthy.")  # a second turn carries the first as history
    wait_idle(page, 4)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["messages"][1]["content"] == expected

    cancelled = _cancelled(web.url)
    set_slider(page, "#max-length", 1024)
    send(page, "Write a long story.")
    page.wait_for_function("document.querySelector('.msg.assistant:last-child .body').textContent.length > 0")
    page.click("#stop")
    wait_idle(page, 6)
    assert page.inner_text(".msg:last-child .note") == "(stopped)"
    deadline = time.monotonic() + 30
    while _cancelled(web.url) != cancelled + 1:  # the aborted fetch freed the server's slot
        assert time.monotonic() < deadline
        time.sleep(0.05)

    page.click("#clear")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0
    assert page.evaluate("window.chatState.messages") == []
    set_slider(page, "#max-length", 16)
    send(page, "你好")
    wait_idle(page, 2)
    assert len(sent[-1]["messages"]) == 1


def _cancelled(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r'^chatglm_requests_total\{finish_reason="cancelled"\} (\S+)$', text, re.M).group(1))


def test_markdown_rendering(web, page):
    page.goto(web.url + "/")
    html = page.evaluate("""renderMarkdown('# Title\\nSome **bold** and `x < y` code.\\n\\n- one\\n- two\\n\\n'
        + '```python\\nprint(\"<b>hi</b>\")\\n```\\n1. first\\n<script>alert(1)</script>')""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x &lt; y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert '<span class="lang">python</span>' in html and "print(&quot;&lt;b&gt;hi&lt;/b&gt;&quot;)" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    # an unterminated fence (mid-stream) still renders as code
    assert "<pre>" in page.evaluate("renderMarkdown('```\\nstill streaming')")
    # how an answer with Markdown looks (a second artifact, for the eye)
    page.evaluate("""addMessage('user', 'Show me a Python function with a short explanation.');
        addMessage('assistant', '## Fibonacci\\nA **recursive** version, fine for small `n`:\\n\\n```python\\n'
        + 'def fib(n: int) -> int:\\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\\n```\\n'
        + '- time: exponential\\n- memory: O(n) stack\\n\\n> Use a loop for large n.')""")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_markdown.png"))
