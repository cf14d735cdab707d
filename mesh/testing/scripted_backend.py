"""A backend for testing API clients against a live node: it runs a real backend (torch by
default, or ``MESH_SCRIPTED_INNER``) and, when a prompt matches a rule of the script, makes the
model answer the rule's reply token by token.

A tiny random model cannot call tools; agents, SDKs and parsers still need to see real tool
calls come out of ``python -m mesh node``. With this backend everything above the logits is
the node's own: chat template, pipeline, sampler (the scripted token gets all the probability
mass, so any temperature draws it), detokenizer, tool-call parser and SSE. The script is a
JSON file named by ``MESH_SCRIPT``: ``[{"when": "text in the prompt", "reply": "answer"}]``;
the first rule whose ``when`` occurs in the decoded prompt (special tokens included) wins, and
its reply ends with the tokenizer's EOS. Prompts no rule matches get the model's own logits.

Limits: the rule is chosen on the stage that sees the token ids, so this backend scripts
single-stage plans (a node serving the whole model); run the node with ``--prefix-cache-mb
0`` so every request's cache sees its whole prompt. Register: entry point ``scripted`` of
``mesh.backends``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import Backend, Progress, StepOutput
from mesh import registry
from mesh.errors import BackendError
from mesh.models import Model
from mesh.wire import WireTensor

SCRIPT_ENV = "MESH_SCRIPT"
INNER_ENV = "MESH_SCRIPTED_INNER"
FORCED_LOGIT = 50.0  # the scripted token's logit; every other token gets -FORCED_LOGIT


@dataclass
class _Cache:
    inner: Any
    seen: list[int] = field(default_factory=list)
    prompt_len: int | None = None
    reply: list[int] | None = None


class ScriptedBackend(Backend):
    """Runs ``inner`` and overrides its last-stage logits where the script says (see module)."""

    name = "scripted"

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        super().__init__()
        inner_name = os.environ.get(INNER_ENV, "torch")
        if inner_name == self.name:
            raise BackendError(f"{INNER_ENV} cannot name the scripted backend itself")
        options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.inner: Backend = registry.load("backend", inner_name, expected=Backend)(**options)
        self.logit_tolerance = self.inner.logit_tolerance
        path = os.environ.get(SCRIPT_ENV)
        if not path:
            raise BackendError(f"the scripted backend needs {SCRIPT_ENV}: a JSON file of "
                               '[{"when": ..., "reply": ...}] rules')
        try:
            with open(path, encoding="utf-8") as f:
                rules = json.load(f)
            self.rules = [(str(r["when"]), str(r["reply"])) for r in rules]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{SCRIPT_ENV}={path}: not a list of {{when, reply}} rules ({exc})") from exc
        self._tokenizer: Any = None
        self._eos: int | None = None

    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        self.inner.load(model, layer_start, layer_end, progress)
        self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, self.inner.num_layers
        self.vocab_size = self.inner.vocab_size
        self._tokenizer = model.tokenizer
        self._eos = min(model.eos_token_ids) if model.eos_token_ids else None

    def adopt_from(self, other: Backend) -> None:
        if isinstance(other, ScriptedBackend):
            self.inner.adopt_from(other.inner)

    def new_cache(self) -> Any:
        return _Cache(self.inner.new_cache())

    def _reply_for(self, prompt: list[int]) -> list[int] | None:
        text = self._tokenizer.decode(prompt, skip_special_tokens=False)
        for when, reply in self.rules:
            if when in text:
                ids = [int(t) for t in self._tokenizer.encode(reply, add_special_tokens=False)]
                return ids + ([self._eos] if self._eos is not None else [])
        return None

    def _forward(self, cache: Any, *, start_pos: int, token_ids: list[int] | None = None,
                 hidden: WireTensor | None = None) -> StepOutput:
        out = self.inner.forward(cache.inner, start_pos=start_pos, token_ids=token_ids, hidden=hidden)
        if token_ids is None or out.logits is None:
            return out
        del cache.seen[start_pos:]
        scripted = (cache.reply is not None and cache.prompt_len is not None and len(token_ids) == 1
                    and start_pos >= cache.prompt_len
                    and cache.reply[min(start_pos - cache.prompt_len, len(cache.reply) - 1)] == token_ids[0])
        cache.seen.extend(token_ids)
        if not scripted:  # a prompt, or the next chunk of one: choose the rule again
            cache.prompt_len = len(cache.seen)
            cache.reply = self._reply_for(cache.seen)
        if cache.reply is None or cache.prompt_len is None:
            return out
        k = len(cache.seen) - cache.prompt_len
        target = cache.reply[min(k, len(cache.reply) - 1)]
        logits = np.full_like(out.logits, -FORCED_LOGIT)
        logits[target] = FORCED_LOGIT
        return StepOutput(hidden=out.hidden, logits=logits)

    def _cached_positions(self, cache: Any) -> int | None:
        return self.inner._cached_positions(cache.inner)

    def unload(self) -> None:
        self.inner.unload()
