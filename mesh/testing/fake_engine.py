"""A scripted ``Engine`` for tests of the HTTP API (and anything else that needs one).

It plays a fixed list of token ids (or asks a callable for them), can pause, hang or fail at
a chosen token, and records how every request ended -- in particular whether the consumer
closed it early (``cancelled``), which is how tests check spec A7 (disconnect cancels).
``FakeStatus`` is the ``ClusterStatus`` beside it (health, cluster info, metrics), which a
test may change at any time. Knows nothing of HTTP. ``ToyTokenizer`` is a byte-level
tokenizer (id = byte value) with special tokens, so tests can split UTF-8 characters across
tokens without loading a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mesh.errors import MeshError
from mesh.runtime.engine import Sampled, SamplingParams, Tokenizer

Script = Sequence[int] | Callable[[list[int], SamplingParams], Iterable[int]]
RequestState = Literal["running", "finished", "cancelled", "failed"]


class ToyTokenizer:
    """Byte-level toy tokenizer: ids 0-255 are bytes; 256+ are special tokens.

    ``decode`` joins the bytes and decodes UTF-8 with U+FFFD for invalid bytes, like a
    byte-level BPE decoder. Special tokens decode to their names unless skipped.
    """

    SPECIAL: ClassVar[dict[int, str]] = {256: "<eos>", 257: "<bos>", 258: "<pad>"}
    eos_token_id = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for t in token_ids:
            if 0 <= t < 256:
                buf.append(t)
            elif t in self.SPECIAL:
                if not skip_special_tokens:
                    out.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                    out.append(self.SPECIAL[t])
            else:
                raise ValueError(f"token id {t} is not in the toy vocabulary (0-258)")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


@dataclass(slots=True, kw_only=True)
class FakeStatus:
    """A ``ClusterStatus`` for tests of the API: ``/health`` reports ``ready`` (ready, reason),
    ``/v1/cluster`` returns ``cluster``, ``/metrics`` the bytes ``metrics()`` returns (404
    while it is None). Fields may be changed while the app runs."""

    ready: tuple[bool, str] = (True, "ready")
    admit: tuple[bool, str] | None = None  # admits(): ``ready`` unless set
    cluster: dict[str, Any] = field(default_factory=lambda: {"model": "fake/model", "num_layers": 1, "members": []})
    metrics: Callable[[], bytes] | None = None

    def health(self) -> tuple[bool, str]:
        return self.ready

    def admits(self) -> tuple[bool, str]:
        return self.admit if self.admit is not None else self.ready

    def cluster_info(self) -> dict[str, Any]:
        return self.cluster

    def metrics_text(self) -> bytes | None:
        return self.metrics() if self.metrics is not None else None


@dataclass(slots=True, kw_only=True)
class FakeRequest:
    """What the fake engine saw of one ``generate`` call (mutable: it is a live record)."""

    prompt_ids: list[int]
    params: SamplingParams
    yielded: list[int] = field(default_factory=list)
    state: RequestState = "running"


class FakeEngine:
    """An ``Engine`` that plays ``script`` token by token.

    ``script``: token ids, or ``f(prompt_ids, params) -> iterable of ids``. An EOS token is
    appended when the script runs out (``append_eos``); generation also ends after an EOS
    or ``params.max_tokens`` tokens, as the Engine contract says.
    ``delay_s``: sleep before each token (seconds). ``hang_after``: after yielding that many
    tokens, wait until cancelled. ``fail_after`` / ``error``: after yielding that many
    tokens, raise ``error`` (default ``RequestFailed``-like ``MeshError``).
    ``encode_chat`` applies the tokenizer's chat template when it has one (a real tokenizer);
    else renders ``<|role|>content\\n`` per message plus ``<|assistant|>`` and tokenizes it
    with ``tokenizer.encode`` -- a stand-in, not a model's template.
    """

    def __init__(
        self,
        *,
        tokenizer: Any | None = None,
        script: Script = (),
        model_id: str = "fake/model",
        context_length: int = 4096,
        eos_token_ids: frozenset[int] | None = None,
        append_eos: bool = True,
        delay_s: float = 0.0,
        hang_after: int | None = None,
        fail_after: int | None = None,
        error: BaseException | None = None,
        encode_error: BaseException | None = None,
    ) -> None:
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ToyTokenizer()
        self.model_id = model_id
        self.context_length = context_length
        if eos_token_ids is None:
            eos_token_ids = frozenset({int(getattr(self.tokenizer, "eos_token_id", 256))})
        self.eos_token_ids = eos_token_ids
        self.script = script
        self.append_eos = append_eos
        self.delay_s = delay_s
        self.hang_after = hang_after
        self.fail_after = fail_after
        self.error = error if error is not None else MeshError("fake engine failure")
        self.encode_error = encode_error
        self.requests: list[FakeRequest] = []
        self._cancelled = asyncio.Event()

    # -- Engine protocol ------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if self.encode_error is not None:
            raise self.encode_error
        if getattr(self.tokenizer, "chat_template", None):  # a real tokenizer: its own template
            ids = self.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
            return [int(x) for x in (ids[0] if ids and isinstance(ids[0], list) else ids)]
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.encode_error is not None:
            raise self.encode_error
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))  # type: ignore[attr-defined]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        record = FakeRequest(prompt_ids=list(prompt_ids), params=params)
        self.requests.append(record)
        return self._play(record)

    # -- what tests look at ---------------------------------------------------------------

    @property
    def cancellations(self) -> int:
        return sum(1 for r in self.requests if r.state == "cancelled")

    async def wait_cancelled(self, timeout_s: float = 5.0) -> None:
        """Return once some request was cancelled; raise TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            await self._cancelled.wait()

    # -- internals ------------------------------------------------------------------------

    def _tokens(self, record: FakeRequest) -> list[int]:
        script = self.script
        ids = list(script(record.prompt_ids, record.params) if callable(script) else script)
        if self.append_eos and not any(t in self.eos_token_ids for t in ids):
            ids.append(min(self.eos_token_ids))
        out: list[int] = []
        for t in ids:
            out.append(t)
            ended = t in self.eos_token_ids and not record.params.ignore_eos
            if ended or len(out) >= record.params.max_tokens:
                break
        return out

    async def _play(self, record: FakeRequest) -> AsyncIterator[int]:
        tokens = self._tokens(record)
        try:
            for i, token in enumerate(tokens):
                if self.fail_after is not None and i >= self.fail_after:
                    record.state = "failed"
                    raise self.error
                if self.hang_after is not None and i >= self.hang_after:
                    await asyncio.Event().wait()  # until cancelled
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if i == len(tokens) - 1:
                    # Closing the iterator after the last token is not a cancellation.
                    record.state = "finished"
                record.yielded.append(token)
                k = record.params.logprobs
                # spec A26: made-up logprobs, -0.25 for the token and -1 less per rank for the alternatives
                yield token if k is None else Sampled(token, -0.25, tuple((token + r, -0.25 - r) for r in range(k)))
            if self.fail_after is not None and self.fail_after >= len(tokens):
                record.state = "failed"
                raise self.error
            record.state = "finished"
        except (GeneratorExit, asyncio.CancelledError):
            if record.state == "running":
                record.state = "cancelled"
                self._cancelled.set()
            raise
