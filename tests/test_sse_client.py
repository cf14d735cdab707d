"""The one streamed chat client of the tools (mesh/tools/sse.py) and the two result shapes on
top of it: the benchmarks' ``stream_request`` (strict: ``[DONE]`` and the exact token count)
and the fault suite's ``stream_chat`` (outcome kinds of specs/faults.md F17). The server is a
scripted HTTP server on 127.0.0.1 with an OS-chosen port; no model, no node."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh.tools.benchutil import stream_request
from mesh.tools.faults.harness import stream_chat
from mesh.tools.sse import ChatChunk, chat_body, chat_chunks, parse_data_line


def data(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj))


def text(piece: str) -> str:
    return data({"choices": [{"index": 0, "delta": {"content": piece}}], "usage": None})


def usage(completion: int, prompt: int = 7) -> str:
    return data({"choices": [], "usage": {"completion_tokens": completion, "prompt_tokens": prompt}})


DONE = "data: [DONE]"


class Script:
    """What the server answers next: a status and body lines (SSE events, blank-line separated)."""

    status = 200
    lines: list[str] = []
    body: str | None = None
    seen: list[dict[str, Any]] = []


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length", 0))
        Script.seen.append(json.loads(self.rfile.read(length)))
        if Script.status != 200:
            payload = (Script.body or "").encode()
            self.send_response(Script.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        payload = "".join(line + "\n\n" for line in Script.lines).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def answer(lines: list[str], *, status: int = 200, body: str | None = None) -> None:
    Script.status, Script.lines, Script.body, Script.seen = status, lines, body, []


# --- the parser ---

@pytest.mark.spec("A3", "A4")
def test_data_lines_parse_into_chunks_and_done_ends_the_stream() -> None:
    lines = [": comment", "", "event: message", text("Hel"), text("lo"), usage(2),
             "data:[DONE]", text("after the end")]
    chunks = list(chat_chunks(lines))
    assert chunks == [ChatChunk(pieces=("Hel",)), ChatChunk(pieces=("lo",)),
                      ChatChunk(completion_tokens=2, prompt_tokens=7), ChatChunk(done=True)]
    # a role-only or empty delta carries no piece; a null delta is no piece either
    assert parse_data_line(data({"choices": [{"delta": {"role": "assistant"}}, {"delta": None}]})) == ChatChunk()
    assert parse_data_line(data({"error": {"message": "boom"}})) == ChatChunk(error="boom")
    assert parse_data_line("  data: [DONE]  ") == ChatChunk(done=True)


@pytest.mark.parametrize("line", ["data: {not json", "data: 3", "data: garbage", 'data: {"error": "x"}',
                                  'data: {"usage": {"completion_tokens": 1}}', 'data: {"choices": [1]}'])
def test_a_malformed_data_line_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        parse_data_line(line)


def test_the_request_body_is_greedy_and_asks_for_usage_only_when_told() -> None:
    body = chat_body("m", "hi", 5)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "max_tokens": 5, "ignore_eos": True, "stream": True}
    assert chat_body("m", "hi", 5, include_usage=True)["stream_options"] == {"include_usage": True}


# --- the benchmarks' shape: strict ---

def test_stream_request_is_ok_only_with_done_and_the_exact_token_count(server: str) -> None:
    answer([text("a"), text("b"), text("c"), usage(3), DONE])
    out = stream_request(server, "m", "hi", 3)
    assert (out["ok"], out["failure"], out["tokens"], out["prompt_tokens"]) == (True, None, 3, 7)
    assert out["ttft_s"] is not None and out["wall_s"] >= out["ttft_s"]
    assert Script.seen[0]["stream_options"] == {"include_usage": True} and Script.seen[0]["max_tokens"] == 3


@pytest.mark.parametrize(("lines", "status", "failure"), [
    ([text("a"), usage(1)], 200, "truncated"),
    ([usage(0), DONE], 200, "empty"),
    ([text("a"), usage(2), DONE], 200, "short"),
    ([text("a"), DONE], 200, "short"),  # no usage chunk: the tokens cannot be counted
    ([text("a"), data({"error": {"message": "stage lost"}}), DONE], 200, "error_event"),
    ([text("a"), "data: {broken", DONE], 200, "transport"),
    ([], 503, "http"),
])
def test_stream_request_names_each_failure(server: str, lines: list[str], status: int, failure: str) -> None:
    answer(lines, status=status, body='{"error": {"message": "no plan yet"}}')
    out = stream_request(server, "m", "hi", 3)
    assert (out["ok"], out["failure"]) == (False, failure), out
    if failure == "error_event":
        assert out["error"] == "stage lost"


def test_stream_request_reports_a_refused_connection_as_transport() -> None:
    out = stream_request("http://127.0.0.1:1", "m", "hi", 3, timeout_s=5)
    assert (out["ok"], out["failure"]) == (False, "transport")


# --- the fault suite's shape: outcome kinds (spec F17) ---

@pytest.mark.spec("F17")
def test_stream_chat_outcomes(server: str) -> None:
    answer([text("Red"), text(", blue"), DONE])
    seen: list[int] = []
    out = stream_chat(server, "p", max_tokens=2, model="m", on_chunk=seen.append)
    assert (out.kind, out.text, len(out.stamps), seen) == ("completed", "Red, blue", 2, [1, 2])
    assert "stream_options" not in Script.seen[0]

    answer([text("Red"), text(", blue"), text(" and"), DONE])
    out = stream_chat(server, "p", model="m", stop_after=2)
    assert (out.kind, out.text) == ("abandoned", "Red, blue")

    answer([text("Red"), data({"error": {"message": "stage lost"}}), DONE])
    out = stream_chat(server, "p", model="m")
    assert (out.kind, out.error) == ("failed_clean", "stage lost")

    answer([text("Red"), data({"error": {"message": "stage lost"}})])  # an error, then no [DONE]
    out = stream_chat(server, "p", model="m")
    assert (out.kind, out.error) == ("lost", "stage lost")

    answer([text("Red")])
    out = stream_chat(server, "p", model="m")
    assert (out.kind, out.error) == ("lost", "the stream ended without [DONE]")

    answer([], status=503, body='{"error": {"message": "no plan yet"}}')
    out = stream_chat(server, "p", model="m")
    assert (out.kind, out.error) == ("failed_clean", "HTTP 503: no plan yet")

    answer([], status=500, body="oops")
    out = stream_chat(server, "p", model="m")
    assert (out.kind, out.error) == ("lost", "HTTP 500 without error JSON")


@pytest.mark.spec("F17")
def test_stream_chat_sees_a_refused_connection_as_a_cut() -> None:
    out = stream_chat("http://127.0.0.1:1", "p", model="m", timeout_s=5)
    assert out.kind == "cut"
