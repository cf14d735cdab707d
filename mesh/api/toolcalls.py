"""Tool calls in a model's own output format, parsed back into OpenAI's shape while it streams.

A chat template renders ``tools`` into the prompt; the model answers with text in its family's
format. This module knows those formats and turns a choice's text, piece by piece, into
content and tool-call deltas:

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call.
- ``llama3`` (Llama 3.1-3.3 JSON tool calling): an answer that starts with ``{`` (or
  ``<|python_tag|>``) is ``{"name": ..., "parameters": {...}}``, calls separated by ``;``.
- ``mistral`` (Mistral v3 tokenizer): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- ``harmony`` (gpt-oss): ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>
  {...}<|call|>``; the ``final`` channel is the content, ``analysis`` is dropped.
- a tokenizer that ships a ``response_template`` (transformers' response-parsing format) is
  parsed with it; its calls arrive whole when their region closes.

Splitting content from call regions (holding back a marker that is still incomplete) is
transformers' streaming ``ResponseParser`` with one response template per family. No library
streams a call's *arguments* while they are written, which OpenAI's delta format asks for, so
``CallScanner`` below does that: a small JSON lexer that finds the call objects, their
``name`` and the raw text of their ``arguments`` as it arrives. Spec: specs/api.md (A21-A23).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.chat_parsing.response_parser import ResponseParser

ARGUMENT_KEYS = ("arguments", "parameters")

_CHATML_ANCHOR = "<|im_start|>assistant\n"
_HERMES = {
    "defaults": {},
    "start_anchor": _CHATML_ANCHOR,
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                       "content": "text"},
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}
_MISTRAL = {
    "defaults": {},
    "start_anchor": "[/INST]",
    "fields": {
        "tool_calls": {"open": "[TOOL_CALLS]", "content": "text"},
        "content": {"content": "text"},
    },
}
_HARMONY = {
    "defaults": {},
    "start_anchor": "<|start|>assistant",
    "fields": {
        "reasoning_content": {"open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>analysis<\|message\|>",
                              "close": "<|end|>", "content": "text"},
        # the region holds "NAME <|constrain|>json<|message|>{...}": see HarmonyCall
        "tool_calls": {"open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>commentary to=functions\.",
                       "close": "<|call|>", "repeats": True, "content": "text"},
        "content": {"open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>final<\|message\|>",
                    "close": ["<|return|>", "<|end|>"], "content": "text"},
    },
}


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call format.

    ``template``: the response template that splits content from calls (None: ``llama3``,
    whose answer is either all calls or all content). ``required`` / ``named``: the text that
    opens a call, prefilled after the generation prompt when ``tool_choice`` is ``required``
    or names a function (``{name}`` is replaced)."""

    name: str
    template: dict[str, Any] | None
    required: str
    named: str

    def prefill(self, choice: str | None) -> str:
        """The text to prefill for ``tool_choice`` (``None``/``"auto"``: nothing; ``"required"``;
        or a function name)."""
        if choice in (None, "auto", "none"):
            return ""
        if choice == "required":
            return self.required
        return self.named.replace("{name}", json.dumps(choice)[1:-1])


FORMATS = {
    "hermes": ToolFormat("hermes", _HERMES, "<tool_call>\n", '<tool_call>\n{"name": "{name}", "arguments": '),
    "llama3": ToolFormat("llama3", None, '{"name": "', '{"name": "{name}", "parameters": '),
    "mistral": ToolFormat("mistral", _MISTRAL, "[TOOL_CALLS][", '[TOOL_CALLS][{"name": "{name}", "arguments": '),
    "harmony": ToolFormat("harmony", _HARMONY, "<|channel|>commentary to=functions.",
                          "<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"),
}


def detect_format(chat_template: str | None, response_template: dict[str, Any] | None = None) -> ToolFormat | None:
    """The tool-call format of a chat template, by the markers it renders; ``None`` if unknown.

    A tokenizer's own ``response_template`` wins (format ``"response_template"``)."""
    if response_template is not None:
        return ToolFormat("response_template", response_template, "", "")
    text = chat_template or ""
    if "<tool_call>" in text:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in text:
        return FORMATS["mistral"]
    if "<|channel|>" in text and "to=functions" in text:
        return FORMATS["harmony"]
    if "<|python_tag|>" in text or '"parameters": dictionary' in text or "ipython" in text:
        return FORMATS["llama3"]
    return None


# -- deltas -----------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """A parsed call: ``arguments`` is the JSON text of the arguments object, as written."""

    index: int
    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What one piece of text adds: ``content`` text, and fragments of calls: a call's first
    fragment carries its ``id`` and ``name`` (``start``), later ones argument text."""

    content: str = ""
    calls: list[tuple[ToolCall, bool, str]] = field(default_factory=list)  # (call, start, argument text)

    def openai_tool_calls(self) -> list[dict[str, Any]]:
        """The ``delta.tool_calls`` list of a chat-completion chunk (OpenAI's format: an
        integer ``index`` on every fragment, ``id``, ``type`` and ``function.name`` on the first)."""
        out: list[dict[str, Any]] = []
        for call, start, text in self.calls:
            if start:
                out.append({"index": call.index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": text}})
            else:
                out.append({"index": call.index, "function": {"arguments": text}})
        return out


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


# -- the JSON call scanner --------------------------------------------------------------------


@dataclass
class _Scan:
    name: str | None = None
    args: str = ""  # argument text seen, not all sent yet when the name came late
    args_is_string: bool = False
    call: ToolCall | None = None
    sent: int = 0
    skip: bool = False  # a call past ``max_calls``: parsed, never sent


class CallScanner:
    """Tool-call objects in JSON text, found while the text arrives.

    A call is any JSON object not nested in another object (so one object, objects separated
    by ``;`` or whitespace, and arrays of objects all work); its ``name`` key names the
    function and its ``arguments`` (or ``parameters``) value is streamed as the raw text the
    model wrote. An ``arguments`` value written as a JSON string holding JSON (some models do)
    is unwrapped when it ends. ``feed`` returns ``(scan, is_new, argument_text)`` fragments
    through ``on_call`` (see ``ToolStream``); text outside call objects is ignored.
    """

    def __init__(self, stream: ToolStream) -> None:
        self._stream = stream
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self._string = ""
        self._call_depth = 0
        self._scan: _Scan | None = None
        self._expect_key = False
        self._key: str | None = None
        self._after_colon = False
        self._value_kind: str | None = None  # None, "args", "name", "other"
        self._value_depth = 0
        self._value_started = False

    def feed(self, text: str) -> None:
        args_piece: list[str] = []
        for ch in text:
            in_args = self._value_kind == "args"
            self._char(ch, args_piece if in_args else None)
            if in_args and self._value_kind != "args" and self._scan is not None:
                self._stream.call_args(self._scan, "".join(args_piece), final=True)
                args_piece = []
        if args_piece and self._scan is not None:
            self._stream.call_args(self._scan, "".join(args_piece), final=False)

    def _char(self, ch: str, args_piece: list[str] | None) -> None:
        if self._in_string:
            if args_piece is not None:
                args_piece.append(ch)
            if self._escape:
                self._escape = False
                self._string += ch
            elif ch == "\\":
                self._escape = True
                self._string += ch
            elif ch == '"':
                self._in_string = False
                self._string_ended()
            else:
                self._string += ch
            return
        depth = len(self._stack)
        if self._value_kind is not None and not self._value_started:
            if ch.isspace():
                return
            self._value_started = True
            self._value_depth = depth
            if self._value_kind == "args" and ch == '"':
                assert self._scan is not None
                self._scan.args_is_string = True
        if args_piece is not None and not (ch in ",}" and depth == self._value_depth):
            args_piece.append(ch)  # a "," or "}" at the value's own depth ends a number or literal
        if ch == '"':
            self._in_string = True
            self._string = ""
        elif ch in "{[":
            if ch == "{" and "{" not in self._stack:
                self._open_call(depth + 1)
            self._stack.append(ch)
        elif ch in "}]":
            if self._stack:
                self._stack.pop()
            new_depth = len(self._stack)
            if self._value_kind is not None and new_depth == self._value_depth and depth > self._value_depth:
                self._value_kind = None  # a container value ended
            elif ch == "}" and depth == self._call_depth and self._scan is not None:
                if self._value_kind == "args" and args_piece:  # a number or literal ended by the "}"
                    self._stream.call_args(self._scan, "".join(args_piece), final=True)
                    args_piece.clear()
                self._value_kind = None
                self._stream.call_end(self._scan)
                self._scan = None
                self._call_depth = 0
        elif ch == ":" and depth == self._call_depth and self._scan is not None and self._key is not None:
            kind = "args" if self._key in ARGUMENT_KEYS else "name" if self._key == "name" else "other"
            self._value_kind, self._value_started, self._key = kind, False, None
        elif ch == "," and depth == self._call_depth:
            self._value_kind = None
            self._expect_key = True

    def _string_ended(self) -> None:
        depth = len(self._stack)
        if depth != self._call_depth or self._scan is None:
            return
        if self._expect_key and self._value_kind is None:
            self._key = _unescape(self._string)
            self._expect_key = False
        elif self._value_kind == "name" and self._value_depth == depth:
            self._stream.call_name(self._scan, _unescape(self._string))
            self._value_kind = None
        elif self._value_kind in ("args", "other") and self._value_depth == depth:
            self._value_kind = None  # a string value ended (feed() flushes an arguments string)

    def close(self) -> None:
        """The region ended (nothing to do: a call ends with its object)."""

    def _open_call(self, depth: int) -> None:
        self._scan = _Scan()
        self._call_depth = depth
        self._expect_key = True
        self._key = None
        self._value_kind = None


def _unescape(raw: str) -> str:
    """A JSON string's body as text; the raw body when the model wrote an invalid escape."""
    if "\\" not in raw and '"' not in raw:
        return raw
    try:
        value = json.loads(f'"{raw}"', strict=False)
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


class ToolStream:
    """One choice's text, piece by piece, as content and tool-call deltas (spec A21).

    ``fmt``: the model's format; ``prefill``: text already placed after the generation prompt
    (``ToolFormat.prefill``), parsed as if generated but never sent as content. ``feed(text)``
    and ``finish()`` return a ``Delta``; ``calls`` holds the calls parsed so far;
    ``id_prefix`` starts every call id (``call_`` for OpenAI, ``toolu_`` for Anthropic);
    ``max_calls``: calls past this many are dropped (``parallel_tool_calls: false`` is 1).
    """

    def __init__(self, fmt: ToolFormat, prefill: str = "", *, id_prefix: str = "call_",
                 max_calls: int | None = None) -> None:
        self.fmt = fmt
        self._max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._id_prefix = id_prefix
        self._delta = Delta()
        self._parser = ResponseParser(fmt.template, prefix="") if fmt.template is not None else None
        self._scanner: CallScanner | None = None  # llama3's whole answer
        self._body: CallScanner | _HarmonyCall | _MistralCalls | None = None  # the open call region's
        self._llama_head = ""  # llama3: text before we know whether the answer is calls
        self._llama_mode: str | None = None
        if prefill:  # a call the prefill opens is sent (its first fragment too); its content is not
            self._delta = Delta(calls=self.feed(prefill).calls)

    # -- what scanners report -------------------------------------------------------------

    def call_name(self, scan: _Scan, name: str) -> None:
        scan.name = name
        self._flush(scan)

    def call_args(self, scan: _Scan, text: str, *, final: bool) -> None:
        scan.args += text
        if final and scan.args_is_string:
            try:
                inner = json.loads(scan.args.strip())
                scan.args = inner if isinstance(inner, str) else json.dumps(inner)
            except ValueError:
                pass
            scan.args_is_string = False
        self._flush(scan)

    def call_end(self, scan: _Scan) -> None:
        if scan.name is None:
            return  # an object with no name is not a call
        if scan.call is None:
            self._flush(scan)
        if scan.call is not None and not scan.args.strip():
            self._delta.calls.append((scan.call, False, "{}"))
            scan.call.arguments = "{}"

    def _flush(self, scan: _Scan) -> None:
        if scan.name is None or scan.args_is_string or scan.skip:
            return  # the header goes first, and a string's JSON is sent once unwrapped
        start = scan.call is None
        if start and self._max_calls is not None and len(self.calls) >= self._max_calls:
            scan.skip = True
            return
        if start:
            scan.call = ToolCall(len(self.calls), new_call_id(self._id_prefix), scan.name)
            self.calls.append(scan.call)
        text = scan.args[scan.sent:]
        if text or start:
            scan.sent = len(scan.args)
            assert scan.call is not None
            scan.call.arguments += text
            self._delta.calls.append((scan.call, start, text))

    # -- text in, deltas out ----------------------------------------------------------------

    def feed(self, text: str) -> Delta:
        if self._parser is None:
            self._llama(text)
        else:
            for event in self._parser.feed(text):
                self._event(event)
        return self._take()

    def finish(self) -> Delta:
        if self._parser is None:
            if self._llama_mode is None and self._llama_head:
                self._delta.content += self._llama_head
        else:
            _, events = self._parser.finalize()
            for event in events:
                self._event(event)
        for call in self.calls:
            if not call.arguments:  # a call cut short: its arguments are an empty object, sent as one
                call.arguments = "{}"
                self._delta.calls.append((call, False, "{}"))
        return self._take()

    def _take(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        return delta

    def _event(self, event: dict[str, Any]) -> None:
        kind, name = event["type"], event.get("field")
        if name == "content" and kind == "region_chunk":
            self._delta.content += event.get("text") or ""
        elif name == "tool_calls":
            if self.fmt.name == "response_template":
                if kind == "region_close":
                    self._whole_calls(event.get("value"))
            elif kind == "region_open":
                self._body = (_HarmonyCall(self) if self.fmt.name == "harmony" else
                              _MistralCalls(self) if self.fmt.name == "mistral" else CallScanner(self))
            elif kind == "region_chunk" and self._body is not None:
                self._body.feed(event.get("text") or "")
            elif kind == "region_close":
                if self._body is not None:
                    self._body.close()
                self._body = None

    def _whole_calls(self, value: Any) -> None:
        for item in value if isinstance(value, list) else [value]:
            fn = item.get("function", item) if isinstance(item, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            if self._max_calls is not None and len(self.calls) >= self._max_calls:
                return
            args = fn.get("arguments", {})
            text = args if isinstance(args, str) else json.dumps(args)
            call = ToolCall(len(self.calls), new_call_id(self._id_prefix), fn["name"], text)
            self.calls.append(call)
            self._delta.calls.append((call, True, text))

    def _llama(self, text: str) -> None:
        if self._llama_mode is None:
            self._llama_head += text
            head = self._llama_head.lstrip()
            if not head:
                return
            tag = "<|python_tag|>"
            if head.startswith("{") or head.startswith(tag):
                self._llama_mode = "calls"
                self._scanner = CallScanner(self)
                text = head[len(tag):] if head.startswith(tag) else head
            elif tag.startswith(head):
                return  # may still become the tag
            else:
                self._llama_mode = "content"
                text = self._llama_head
        if self._llama_mode == "calls":
            assert self._scanner is not None
            self._scanner.feed(text)
        else:
            self._delta.content += text


class _MistralCalls:
    """Mistral's call region after ``[TOOL_CALLS]``: a JSON list of calls (v3 tokenizers), or
    ``NAME[ARGS]{...}`` calls each opened by ``[TOOL_CALLS]`` (v11 and later)."""

    ARGS, NEXT = "[ARGS]", "[TOOL_CALLS]"

    def __init__(self, stream: ToolStream) -> None:
        self._stream = stream
        self._json: CallScanner | None = None
        self._head = ""  # v11: the name, until [ARGS]
        self._tail = ""  # v11: argument text held while it may be the start of [TOOL_CALLS]
        self._scan: _Scan | None = None
        self._v11: bool | None = None

    def feed(self, text: str) -> None:
        if self._v11 is None:
            self._head += text
            first = self._head.lstrip()[:1]
            if not first:
                return
            self._v11 = first not in "[{"
            text, self._head = self._head, ""
            if not self._v11:
                self._json = CallScanner(self._stream)
        if self._json is not None:
            self._json.feed(text)
            return
        self._v11_feed(text)

    def _v11_feed(self, text: str) -> None:
        while text:
            if self._scan is None:  # reading a name
                self._head += text
                name, found, text = self._head.partition(self.ARGS)
                if not found:
                    return
                self._head = ""
                self._scan = _Scan()
                self._stream.call_name(self._scan, name.replace(self.NEXT, "").strip())
                continue
            buffer = self._tail + text
            at = buffer.find(self.NEXT)
            if at >= 0:  # this call's arguments end, the next call begins
                self._stream.call_args(self._scan, buffer[:at].rstrip(), final=True)
                self._stream.call_end(self._scan)
                self._scan, self._tail, text = None, "", buffer[at + len(self.NEXT):]
                continue
            keep = next((k for k in range(min(len(buffer), len(self.NEXT) - 1), 0, -1)
                         if self.NEXT.startswith(buffer[-k:])), 0)
            self._stream.call_args(self._scan, buffer[:len(buffer) - keep], final=False)
            self._tail = buffer[len(buffer) - keep:]
            return

    def close(self) -> None:
        if self._scan is not None:
            self._stream.call_args(self._scan, self._tail.rstrip(), final=True)
            self._stream.call_end(self._scan)
            self._scan = None


class _HarmonyCall:
    """gpt-oss's call region: ``NAME [<|constrain|>json]<|message|>ARGUMENTS``."""

    def __init__(self, stream: ToolStream) -> None:
        self._stream = stream
        self._head = ""
        self._scan: _Scan | None = None

    def feed(self, text: str) -> None:
        if self._scan is None:
            self._head += text
            marker = "<|message|>"
            if marker not in self._head:
                return
            header, _, text = self._head.partition(marker)
            scan = _Scan()
            words = header.split("<|")[0].split()
            self._stream.call_name(scan, words[0] if words else "")
            self._scan = scan
        self._stream.call_args(self._scan, text, final=False)

    def close(self) -> None:
        if self._scan is not None:
            self._stream.call_end(self._scan)
