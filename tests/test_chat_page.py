"""The chat page at ``/`` in a real browser: Debian's chromium driven by Playwright (nothing
downloaded at test time), against a two-model server on scripted engines: a reply streams in
as Markdown, thinking is collapsed, a reply is stopped, the model is switched, HTML in a reply
stays text, and the page asks for the API key once."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.server.management.pool import ModelPool, ModelSpec
from tests.test_server_fakes import FakeEngine

pytest_plugins = ["tests.server_fixtures"]  # the tokenizer fixture
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium; `just test` does it "
                "where apt is available): the chat page browser test is skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (the dev extra has it)")

ALPHA = "<think>Let me think.</think>Hello from **alpha**.\n\n```python\nprint(1)\n```"
BETA = "Hi from beta <b>not bold</b> <img src=x onerror=alert(1)>"
LONG = " ".join(["word"] * 400)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def reply_for(model: str, tokenizer: Any):
    def reply(prompt: Any, params: Any) -> str:
        text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        if "long" in text.rsplit("<|im_start|>user", 1)[-1]:  # the latest message
            return LONG
        return ALPHA if model == "alpha" else BETA
    return reply


@contextlib.contextmanager
def serve(tokenizer, single: bool = False,
          **server: Any) -> Iterator[tuple[str, dict[str, FakeEngine]]]:
    """A two-model server (scripted engines, 20 ms a token) on loopback, in a thread;
    ``single``: today's one-model server on one scripted engine."""
    engines: dict[str, FakeEngine] = {}

    def factory(spec: ModelSpec, thread: Any) -> FakeEngine:
        engine = FakeEngine(tokenizer, reply_for(spec.id, tokenizer), token_delay=0.02)
        engines[spec.id] = engine
        return engine

    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        pool = ModelPool([ModelSpec(m, EngineConfig(model=m)) for m in ("alpha", "beta")],
                         factory=factory)
        app = (create_app(server_config=ServerConfig(**server), engine=factory(pool.specs["alpha"], None))
               if single else create_app(server_config=ServerConfig(**server), models=pool))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await box["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the test server did not start"
    try:
        yield box["url"], engines
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


@pytest.fixture
def browser_page(tmp_path, monkeypatch):
    # The optimised BLAS preloaded into the tests must not reach node and chromium (their
    # threads fail to start under it).
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 390, "height": 800})  # a phone-sized window
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def send(page, text: str) -> Any:
    page.fill("#input", text)
    page.click("#send")
    return page.locator(".msg.assistant").last


def test_chat_streams_markdown_thinking_stop_and_switch(tokenizer, browser_page):
    page = browser_page
    with serve(tokenizer) as (url, engines):
        page.goto(url)
        sync_api.expect(page.locator("#model option")).to_have_text(
            ["alpha (not loaded)", "beta (not loaded)"])

        reply = send(page, "hello")
        content = reply.locator(".content")
        # Streaming: the stop button shows while the first words are on screen.
        sync_api.expect(page.locator("#stop")).to_be_visible()
        sync_api.expect(reply.locator(".metrics")).to_contain_text("tok/s", timeout=15000)
        assert content.locator("strong").inner_text() == "alpha"
        assert content.locator("pre code").inner_text() == "print(1)"
        thinking = reply.locator("details.thinking")
        assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed
        assert thinking.locator(".body").text_content() == "Let me think."
        assert "TTFT" in reply.locator(".metrics").inner_text()
        sync_api.expect(page.locator("#model option").first).to_have_text("alpha")  # now loaded

        reply = send(page, "a long one please")
        sync_api.expect(reply.locator(".content")).to_contain_text("word word")
        page.click("#stop")
        sync_api.expect(reply.locator(".metrics")).to_contain_text("stopped")
        assert len(reply.locator(".content").inner_text()) < len(LONG)
        sync_api.expect(page.locator("#stop")).to_be_hidden()
        for _ in range(100):  # the server saw the client go and aborted the request
            if engines["alpha"].aborted:
                break
            page.wait_for_timeout(50)
        assert engines["alpha"].aborted

        page.select_option("#model", "beta")
        reply = send(page, "and you?")
        sync_api.expect(reply.locator(".metrics")).to_contain_text("tok/s")
        content = reply.locator(".content")
        assert "Hi from beta <b>not bold</b>" in content.inner_text()
        assert content.locator("b, img").count() == 0  # HTML in a reply stays text
        assert len(engines["beta"].calls) == 1
        sync_api.expect(page.locator("#stats")).to_contain_text("queued 0")


def test_the_page_asks_for_the_api_key_once(tokenizer, browser_page):
    page = browser_page
    prompts: list[str] = []

    def answer(dialog) -> None:
        prompts.append(dialog.message)
        dialog.accept("sekret")

    page.on("dialog", answer)
    with serve(tokenizer, api_key="sekret") as (url, _):
        page.goto(url)
        sync_api.expect(page.locator("#model option")).to_have_count(2)
        reply = send(page, "hello")
        sync_api.expect(reply.locator(".metrics")).to_contain_text("tok/s", timeout=15000)
        assert len(prompts) == 1 and "API key" in prompts[0]
        assert page.evaluate("sessionStorage.getItem('apiKey')") == "sekret"


def test_the_page_on_a_one_model_server(tokenizer, browser_page):
    page = browser_page
    with serve(tokenizer, single=True) as (url, engines):
        page.goto(url)
        sync_api.expect(page.locator("#model option")).to_have_text(["fake-qwen3"])
        reply = send(page, "hello")
        sync_api.expect(reply.locator(".metrics")).to_contain_text("tok/s", timeout=15000)
        assert reply.locator(".content strong").inner_text() == "alpha"
        sync_api.expect(page.locator("#stats")).to_contain_text("running 0")
        assert len(engines["alpha"].calls) == 1
