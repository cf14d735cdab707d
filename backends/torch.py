"""The torch backend: transformers' own model classes, sliced to a layer range.

The stage module is ``AutoModelForCausalLM.from_config`` of a config cut down to the
stage's layers (``mesh.models.sliced_config``), built on the meta device and filled with
only the tensors of that range, so the math is transformers' (attention, RoPE, masks, KV
cache) and no model code is written here. Non-first stages drop the embeddings; non-last
stages drop the final norm and LM head. Spec: specs/backend.md (B1-B6).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.base import Backend, Progress, StepOutput, check_range
from mesh.errors import BackendError, ModelError
from mesh.models import Model, layer_of, sliced_config
from mesh.wire import WireTensor

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
WIRE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_to_wire(t: torch.Tensor) -> WireTensor:
    """A float tensor as a WireTensor (little-endian raw bytes, bf16 carried as its bits)."""
    if t.dtype not in WIRE_NAMES:
        raise BackendError(f"cannot send dtype {t.dtype}; valid: {sorted(WIRE_NAMES.values())}")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return WireTensor(dtype=WIRE_NAMES[t.dtype], shape=tuple(t.shape), data=raw.numpy().tobytes())


def wire_to_tensor(w: WireTensor) -> torch.Tensor:
    """The inverse of ``tensor_to_wire`` (copies the bytes into a fresh tensor)."""
    if w.dtype not in TORCH_DTYPES:
        raise BackendError(f"hidden states must be f32, f16 or bf16, got {w.dtype}")
    flat = torch.frombuffer(bytearray(w.data), dtype=TORCH_DTYPES[w.dtype])
    return flat.reshape(w.shape)


class TorchBackend(Backend):
    """A pipeline stage run by transformers on torch (CPU, CUDA or MPS).

    Args:
        device: torch device string; default ``cuda`` when available, else ``cpu``.
        dtype: compute dtype name (``f32``, ``f16``, ``bf16``); default f32 on CPU, f16 on GPU.
    """

    name = "torch"

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        super().__init__()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise BackendError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from exc
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
        if not available.get(self.device.type, False):
            usable = [name for name, ok in available.items() if ok]
            raise BackendError(f"--device {device!r} is not available in this torch build; usable: {usable}")
        if dtype is None:
            dtype = "f32" if self.device.type == "cpu" else "f16"
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"unknown dtype {dtype!r}; valid: {sorted(TORCH_DTYPES)}")
        self.dtype = TORCH_DTYPES[dtype]
        self._model: Any = None
        self._config: Any = None
        self._lock = threading.Lock()  # one step at a time: transformers modules are not re-entrant
        self.hidden_size = 0

    # -- loading -----------------------------------------------------------------------
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        from transformers import AutoModelForCausalLM

        config = model.config
        num_layers = int(config.num_hidden_layers)
        check_range(layer_start, layer_end, num_layers)
        sub = sliced_config(config, layer_start, layer_end)
        first, last = layer_start == 0, layer_end == num_layers
        with torch.device("meta"):
            stage = AutoModelForCausalLM.from_config(sub, dtype=self.dtype)
        wanted: dict[str, str] = {}  # local name -> global (file) name
        for local in stage.state_dict():
            idx = layer_of(local)
            if idx is not None:
                wanted[local] = local.replace(f"model.layers.{idx}.", f"model.layers.{idx + layer_start}.", 1)
            elif local.startswith("model.embed_tokens.") and first:
                wanted[local] = local
            elif (local.startswith("model.norm.") or local.startswith("lm_head.")) and last:
                wanted[local] = local
        source = model.tensor_source()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if "lm_head.weight" in wanted and (tied or not _source_has(source, "lm_head.weight")):
            wanted["lm_head.weight"] = "model.embed_tokens.weight"
        total = len(set(wanted.values()))
        done = 0

        def step(_name: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        tensors = source.load(sorted(set(wanted.values())), on_tensor=step)
        state = {local: tensors[src].to(self.dtype) for local, src in wanted.items()}
        if not first:
            stage.model.embed_tokens = None
        if not last:
            stage.model.norm = nn.Identity()
            stage.lm_head = None
        stage.load_state_dict(state, strict=False, assign=True)
        # RoPE inverse frequencies are computed at init, so rebuild them off the meta device.
        stage.model.rotary_emb = type(stage.model.rotary_emb)(config=sub)
        still_meta = [n for n, t in list(stage.named_parameters()) + list(stage.named_buffers()) if t.is_meta]
        if still_meta:
            raise ModelError(f"tensors missing from the model files: {still_meta[:5]}")
        stage.to(self.device).eval()
        with self._lock:
            self._model, self._config = stage, sub
            self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, num_layers
            self.hidden_size = int(config.hidden_size)
            self._cache_kw = "cache" if "cache" in inspect.signature(stage.model.forward).parameters else "past_key_values"
        self._warm_up()
        log.info("torch backend: loaded layers [%d, %d) of %d on %s", layer_start, layer_end, num_layers, self.device)

    def _warm_up(self) -> None:
        # The first forward pays one-off costs (kernel selection, allocator growth): pay them
        # at load time rather than in the first request's TTFT.
        cache = self.new_cache()
        if self.layer_start == 0:
            self.forward(cache, start_pos=0, token_ids=[0, 0])
        else:
            zeros = tensor_to_wire(torch.zeros(1, 2, self.hidden_size, dtype=self.dtype))
            self.forward(cache, start_pos=0, hidden=zeros)

    def unload(self) -> None:
        with self._lock:
            self._model = self._config = None
            super().unload()

    # -- compute -----------------------------------------------------------------------
    def new_cache(self) -> Any:
        from transformers import DynamicCache

        if self._config is None:
            raise BackendError("no layers loaded")
        return DynamicCache(config=self._config)

    @torch.inference_mode()
    def forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        with self._lock:
            model = self._model
            if model is None:
                raise BackendError("no layers loaded")
            kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
            if self.layer_start == 0:
                if token_ids is None or hidden is not None or not token_ids:
                    raise BackendError("the first stage takes token ids, not hidden states")
                n = len(token_ids)
                vocab = int(self._config.vocab_size)
                if not all(type(t) is int and 0 <= t < vocab for t in token_ids):
                    raise BackendError(f"token ids must be integers in [0, {vocab})")
                kwargs["input_ids"] = torch.tensor([token_ids], dtype=torch.long, device=self.device)
            else:
                if hidden is None or token_ids is not None:
                    raise BackendError("a later stage takes hidden states, not token ids")
                if len(hidden.shape) != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
                    raise BackendError(
                        f"hidden states must be [1, n, {self.hidden_size}], got {list(hidden.shape)}"
                    )
                n = hidden.shape[1]
                embeds = wire_to_tensor(hidden).to(self.device, self.dtype)
                if not bool(torch.isfinite(embeds).all()):
                    raise BackendError("hidden states hold NaN or infinite values")
                kwargs["inputs_embeds"] = embeds
            if start_pos < 0 or start_pos + n > int(getattr(self._config, "max_position_embeddings", 1 << 30)):
                raise BackendError(f"positions {start_pos}..{start_pos + n - 1} are outside the context window")
            kwargs["position_ids"] = torch.arange(start_pos, start_pos + n, device=self.device).unsqueeze(0)
            out = model.model(**kwargs).last_hidden_state
            if self.layer_end < self.num_layers:
                return StepOutput(hidden=tensor_to_wire(out))
            logits = model.lm_head(out[:, -1, :]).float()
            return StepOutput(logits=logits[0].cpu().numpy().astype(np.float32, copy=False))


def _source_has(source: Any, name: str) -> bool:
    if hasattr(source, "has"):
        return bool(source.has(name))
    return name in source.names()
