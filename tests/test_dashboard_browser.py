"""The dashboard (spec A18) in headless Chromium against a real 2-node loopback cluster.

Uses the system's ``chromium`` (Debian package) through Playwright's Python API; Playwright
never downloads a browser here. Skipped when either is missing, except under CI (``CI`` set),
where they must be installed (.ci/run installs chromium; the ``test`` extra has playwright).
A full-page screenshot goes to ``$MESH_ARTIFACTS/dashboard.png`` (default ``<repo>/artifacts``).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from mesh.api.app import create_app
from mesh.errors import RequestFailed
from mesh.testing import FakeEngine, ToyTokenizer
from mesh.testing.cluster import LocalCluster, http_json
from mesh.testing.fake_engine import FakeStatus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def _browser_tools() -> tuple[str, Any, Any]:
    """(chromium path, sync_playwright, expect), or skip -- or fail under CI."""
    chromium = shutil.which("chromium")
    playwright: Any = None
    try:
        import playwright.sync_api as playwright
    except ImportError:
        pass
    missing = [name for name, found in (("chromium", chromium), ("playwright", playwright)) if not found]
    if missing:
        message = (f"{' and '.join(missing)} not installed: apt-get install chromium; "
                   "pip install playwright (never `playwright install`)")
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the dashboard's browser test tools: {message}")
        pytest.skip(message)
    assert chromium is not None
    return chromium, playwright.sync_playwright, playwright.expect


def _launch(p: Any, chromium: str) -> Any:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    return p.chromium.launch(executable_path=chromium, headless=True,
                             args=["--no-sandbox", "--disable-dev-shm-usage"])


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    """``app`` on a real uvicorn server on 127.0.0.1 (in a thread); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _artifacts() -> Path:
    path = Path(os.environ.get("MESH_ARTIFACTS") or ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.spec("A18")
def test_dashboard_shows_the_cluster_and_chats(tmp_path: Path) -> None:
    chromium, sync_playwright, expect = _browser_tools()
    screenshot = _artifacts() / "dashboard.png"
    with LocalCluster(2, tmp_path) as cluster:
        cluster.wait_ready()
        node = cluster.nodes[0]
        _, info = http_json(node.api_url + "/v1/cluster")
        ranges = {m["id"]: f"[{m['layer_start']}, {m['layer_end']})" for m in info["members"]}
        assert sorted(ranges.values()) == ["[0, 15)", "[15, 30)"]
        with sync_playwright() as p:
            browser = _launch(p, chromium)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            try:
                page.goto(node.api_url + "/")
                members = page.locator("#members")
                for member_id, layers in ranges.items():
                    row = members.locator(f'tr[data-member="{member_id}"]')
                    expect(row).to_contain_text(member_id[:8], timeout=30_000)
                    expect(row).to_contain_text(layers, timeout=30_000)
                expect(members).to_contain_text("this node")
                expect(page.locator("#h-ready")).to_have_text("ready", timeout=30_000)

                box = page.locator("#chat-send").bounding_box()  # the chat is above the fold
                assert box is not None and box["y"] + box["height"] <= 1000, box
                page.fill("#chat-input", QUESTION)
                page.click("#chat-send")
                answer = page.locator('.assistant[data-done="true"]')
                expect(answer).to_have_count(1, timeout=120_000)
                text = answer.inner_text().strip()
                assert answer.get_attribute("data-error") is None, f"the chat failed: {text}"
                assert answer.locator(".error").count() == 0, text
                assert len(text) >= 5, f"answer too short: {text!r}"
                expect(page.locator("#chat-log .user")).to_have_text(QUESTION)
                # the request shows up under Requests once the next poll comes (not asserted:
                # it only makes the screenshot tell the whole story)
                try:
                    expect(page.locator("#recent tbody tr:not(.empty)")).not_to_have_count(0, timeout=5_000)
                except AssertionError:
                    pass
                assert not errors, f"JavaScript errors on the page: {errors}"
            finally:
                page.screenshot(path=str(screenshot), full_page=True)
                browser.close()
    assert screenshot.stat().st_size > 10_000


HOSTILE = '<img src=x onerror="window.pwned=1">'


@pytest.mark.spec("A18", "A12")
def test_dashboard_asks_for_the_key_escapes_text_and_shows_stream_errors() -> None:
    """Against the API over a FakeEngine (no model): a 401 asks for the key, the typed key is
    sent (and kept in localStorage), API strings stay text, a member without layers and the
    routine events are shown as such, a mid-stream error is shown."""
    chromium, sync_playwright, expect = _browser_tools()
    cluster = {
        "model": "fake/model", "num_layers": 4, "plan_id": "p1", "ready": False, "reason": HOSTILE,
        "members": [{"id": "a" * 64, "address": HOSTILE, "api_address": "", "backend": "torch",
                     "memory_bytes": 1 << 30, "layer_start": 0, "layer_end": 4, "role": "both",
                     "state": "ready", "self": True},
                    {"id": "b" * 64, "address": "127.0.0.1:2", "api_address": "", "backend": "torch",
                     "memory_bytes": 1 << 30, "layer_start": 0, "layer_end": 0, "role": "both", "state": "idle"}],
        "links": [], "local": {"id": "a" * 64},
        "events": [{"type": "status.set", "key": HOSTILE, "origin": "a" * 64, "seq": 1, "time_ms": 0}]
        + [{"type": kind, "key": f"kv/{i}", "origin": "a" * 64, "seq": 2 + i, "time_ms": 1}
           for i, kind in enumerate(["kv.placed", "kv.freed", "link.measured"] * 5)],
    }
    engine = FakeEngine(script=ToyTokenizer().encode("Hello world"), fail_after=3,
                        error=RequestFailed("stage 1 went away"))
    status = FakeStatus(cluster=cluster)
    with _serve(create_app(engine, status, api_key="k3y")) as url, sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            expect(page.locator("#notice")).to_contain_text("API key", timeout=10_000)
            page.fill("#api-key", "wrong")
            expect(page.locator("#notice")).to_contain_text("rejected", timeout=10_000)
            page.fill("#api-key", "k3y")
            expect(page.locator("#members")).to_contain_text("[0, 4)", timeout=10_000)
            expect(page.locator("#notice")).to_be_hidden()
            assert page.evaluate("localStorage.getItem('mesh.apiKey')") == "k3y"
            # API strings are text, never markup
            expect(page.locator("#members")).to_contain_text(HOSTILE)
            expect(page.locator("#h-ready")).to_contain_text(HOSTILE)
            assert page.locator("img").count() == 0 and page.evaluate("window.pwned") is None
            # a member with no layers serves the API: said plainly, not as a warning
            expect(page.locator(f'tr[data-member="{"b" * 64}"]')).to_contain_text("no layers (serves the API)")
            # routine events (KV placements, link measurements) are hidden until asked for
            expect(page.locator("#events-count")).to_have_text("1 of 16")
            assert page.locator("#events tbody tr").count() == 1
            page.check("#events-all")
            expect(page.locator("#events tbody tr")).to_have_count(16)
            assert page.get_attribute("#api-key", "placeholder") != "none"

            page.fill("#chat-input", "hi")
            page.click("#chat-send")
            answer = page.locator('.assistant[data-done="true"]')
            expect(answer).to_have_count(1, timeout=10_000)
            assert answer.get_attribute("data-error") == "true"
            expect(answer).to_contain_text("Hel")
            expect(answer.locator(".error")).to_contain_text("stage 1 went away")
            assert engine.requests[0].params.max_tokens == 128
            # an HTTP error (OpenAI's error JSON) is shown with its status and message
            status.ready = (False, "loading layers")
            page.fill("#chat-input", "again")
            page.click("#chat-send")
            expect(answer).to_have_count(2, timeout=10_000)
            expect(answer.nth(1).locator(".error")).to_contain_text("HTTP 503")
            expect(answer.nth(1).locator(".error")).to_contain_text("loading layers")
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()
