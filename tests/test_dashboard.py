"""The dashboard page at ``GET /`` (mesh/api/dashboard/index.html; spec A18), without a browser.

tests/test_dashboard_browser.py drives the page in headless Chromium against real nodes.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib.resources import files

import httpx
import pytest

from mesh.api.app import create_app
from mesh.testing import FakeEngine, ToyTokenizer
from mesh.testing.fake_engine import FakeStatus

MODEL = "fake/model"
KEY = "s3cret"


class _Refs(HTMLParser):
    """Every src= / href= / action= / poster= / srcset= attribute value, and the elements seen."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "action", "poster", "srcset", "data"} and value is not None:
                self.refs.append((tag, name, value))
            if name == "id" and value:
                self.ids.add(value)


def _app(api_key: str | None = KEY) -> object:
    engine = FakeEngine(script=ToyTokenizer().encode("Hello"), model_id=MODEL, context_length=64)
    return create_app(engine, FakeStatus(), api_key=api_key)


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


@pytest.mark.spec("A18", "A12")
async def test_page_needs_no_key_but_the_data_does() -> None:
    async with _client(_app()) as c:
        page = await c.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
        assert "<title>mesh</title>" in page.text
        # the data behind it still needs the key (A12)
        r = await c.get("/v1/cluster")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await c.get("/v1/cluster", headers={"Authorization": "Bearer " + KEY})
        assert r.status_code == 200
        # only the page itself is exempt, not what lies under it
        assert (await c.get("/index.html")).status_code == 401
        assert (await c.post("/", json={})).status_code == 405  # exempt like /health: by path
    async with _client(_app(api_key=None)) as c:
        assert (await c.get("/")).status_code == 200


@pytest.mark.spec("A18")
async def test_page_is_self_contained() -> None:
    async with _client(_app()) as c:
        html = (await c.get("/")).text
    assert html == (files("mesh.api") / "dashboard" / "index.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(html)
    external = [ref for ref in parser.refs if re.match(r"\s*(https?:)?//", ref[2], re.IGNORECASE)]
    assert not external, f"external resources: {external}"
    # no external stylesheet, import, font or script anywhere, in attributes, CSS or JS
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.IGNORECASE)
    assert "<script src" not in html.lower()
    # the stable element ids the browser test and users rely on
    assert {"members", "chat-input", "chat-send", "chat-log", "api-key"} <= parser.ids
    # the page reads its data from the API, sending the key the user typed
    for needle in ("v1/cluster", "v1/chat/completions", "Authorization", "localStorage", "getReader"):
        assert needle in html, needle


@pytest.mark.spec("A18")
def test_page_never_puts_api_strings_in_html() -> None:
    html = (files("mesh.api") / "dashboard" / "index.html").read_text(encoding="utf-8")
    script = html[html.index("<script>"):]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
