"""The torch backend: transformers' own model classes, sliced to a layer range.

The stage module is ``AutoModelForCausalLM.from_config`` of a config cut down to the
stage's layers (``mesh.models.sliced_config``), built on the meta device and filled with
only the tensors of that range, so the math is transformers' (attention, RoPE, masks, KV
cache) and no model code is written here. Non-first stages drop the embeddings; non-last
stages drop the final norm and LM head. A backend can adopt the one it replaces and reuse
the layer modules both ranges share (``adopt_from``). Spec: specs/backend.md (B1-B6, B9).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.base import Backend, Progress, StepOutput, check_range, source_has
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
    logit_tolerance = 1e-4  # transformers' own modules: only the stage split differs

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
        self.compute_dtype = dtype
        self._model: Any = None
        self._config: Any = None
        self._donor: TorchBackend | None = None  # offered by adopt_from, taken by the next load
        self._model_config: Any = None  # the loaded model's config object and id (reuse check)
        self._model_id = ""
        self.reused_layers = 0  # decoder layers the last load took from its donor

    def adopt_from(self, other: Backend) -> None:
        """Offer the layers of ``other`` to the next ``load`` (see ``Backend.adopt_from``).

        Accepted only from a loaded TorchBackend on the same device with the same dtype;
        ``load`` then also requires the same model (config object or model id) and ignores
        the offer otherwise. Nothing of ``other`` is touched here.

        Thread safety: ``load`` may run while ``other`` still serves a step on another thread.
        It takes ``other``'s lock to take the shared modules and renumber their ``layer_idx``
        (which indexes the KV cache, so it must become the layer's index in the new stage),
        and then marks ``other`` unloaded: a later ``forward`` on it raises
        BackendError("no layers loaded") instead of computing with renumbered layers. The
        reused modules are only read afterwards. ``load`` drops the reference to ``other``
        whether it succeeds or fails.
        """
        self._donor = None
        if (isinstance(other, TorchBackend) and other is not self and other.loaded
                and other.device == self.device and other.dtype == self.dtype):
            self._donor = other

    # -- loading -----------------------------------------------------------------------
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        from transformers import AutoModelForCausalLM

        donor, self._donor = self._donor, None  # held only until its modules are taken
        try:
            config = model.config
            num_layers = int(config.num_hidden_layers)
            check_range(layer_start, layer_end, num_layers)
            sub = sliced_config(config, layer_start, layer_end)
            first, last = layer_start == 0, layer_end == num_layers
            with torch.device("meta"):
                stage = AutoModelForCausalLM.from_config(sub, dtype=self.dtype)
            reused = _take_layers(donor, model, stage, layer_start, layer_end) if donor is not None else 0
        finally:
            donor = None  # pin none of the donor's memory, loaded or not
        wanted: dict[str, str] = {}  # local name -> global (file) name, for what is still on meta
        for local, tensor in stage.state_dict().items():
            if not tensor.is_meta:
                continue  # reused from the donor
            idx = layer_of(local)
            if idx is not None:
                wanted[local] = local.replace(f"model.layers.{idx}.", f"model.layers.{idx + layer_start}.", 1)
            elif local.startswith("model.embed_tokens.") and first:
                wanted[local] = local
            elif (local.startswith("model.norm.") or local.startswith("lm_head.")) and last:
                wanted[local] = local
        source = model.tensor_source() if wanted else None  # opening the files is not free
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if last and source is not None and (tied or not source_has(source, "lm_head.weight")):
            # the head is the embeddings: one tensor for both
            if "lm_head.weight" in wanted and first and "model.embed_tokens.weight" not in wanted:
                stage.lm_head.weight = stage.model.embed_tokens.weight  # embeddings reused
                del wanted["lm_head.weight"]
            elif "lm_head.weight" in wanted:
                wanted["lm_head.weight"] = "model.embed_tokens.weight"
            elif "model.embed_tokens.weight" in wanted:  # head reused
                stage.model.embed_tokens.weight = stage.lm_head.weight
                del wanted["model.embed_tokens.weight"]
        total = len(set(wanted.values()))
        done = 0

        def step(_name: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        tensors = source.load(sorted(set(wanted.values())), on_tensor=step) if source is not None else {}
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
            self.set_dimensions(config)
            self._cache_kw = "cache" if "cache" in inspect.signature(stage.model.forward).parameters else "past_key_values"
            self._model_config, self._model_id = config, model.model_id
            self.reused_layers = reused
        self._warm_up()
        log.info("torch backend: loaded layers [%d, %d) of %d on %s (%d reused, %d read)", layer_start, layer_end,
                 num_layers, self.device, reused, layer_end - layer_start - reused)

    def _drop_layers(self) -> None:
        self._model = self._config = None

    # -- compute -----------------------------------------------------------------------
    def new_cache(self) -> Any:
        from transformers import DynamicCache

        if self._config is None:
            raise BackendError("no layers loaded")
        return DynamicCache(config=self._config)

    def _cached_positions(self, cache: Any) -> int:
        return int(cache.get_seq_length()) if len(cache.layers) else 0

    @torch.inference_mode()
    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        with self._lock:
            if self._config is None:  # unloaded (or given to an adopting stage) since the checks
                raise BackendError("no layers loaded")
            out = []
            for i, layer in enumerate(cache.layers):
                keys = layer.keys[:, :, start_pos:end_pos, :]
                values = layer.values[:, :, start_pos:end_pos, :]
                out.append((self.layer_start + i, tensor_to_wire(keys), tensor_to_wire(values)))
            return out

    @torch.inference_mode()
    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        with self._lock:
            if self._config is None:
                raise BackendError("no layers loaded")
            tensors = [(wire_to_tensor(k).to(self.device, self.dtype), wire_to_tensor(v).to(self.device, self.dtype))
                       for _, k, v in layers]
            for i, (k, v) in enumerate(tensors):  # all converted first: a bad layer changes nothing
                cache.update(k, v, i)

    @torch.inference_mode()
    def _forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        with self._lock:
            model = self._model
            if model is None:  # unloaded (or given to an adopting stage) since the checks
                raise BackendError("no layers loaded")
            kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
            if token_ids is not None:
                n = len(token_ids)
                kwargs["input_ids"] = torch.tensor([token_ids], dtype=torch.long, device=self.device)
            else:
                assert hidden is not None  # Backend.forward gives exactly one of the two
                n = hidden.shape[1]
                kwargs["inputs_embeds"] = wire_to_tensor(hidden).to(self.device, self.dtype)
            kwargs["position_ids"] = torch.arange(start_pos, start_pos + n, device=self.device).unsqueeze(0)
            out = model.model(**kwargs).last_hidden_state
            if self.layer_end < self.num_layers:
                return StepOutput(hidden=tensor_to_wire(out))
            logits = model.lm_head(out[:, -1, :]).float()
            return StepOutput(logits=logits[0].cpu().numpy().astype(np.float32, copy=False))


def _take_layers(donor: TorchBackend, model: Model, stage: Any, layer_start: int, layer_end: int) -> int:
    """Move the modules ``donor`` shares with the meta ``stage`` into ``stage`` and mark
    ``donor`` unloaded if it gave any; returns how many decoder layers it gave."""
    num_layers = int(model.config.num_hidden_layers)
    with donor._lock:
        old = donor._model
        if old is None or donor.num_layers != num_layers or not (
            donor._model_config is model.config or donor._model_id == model.model_id
        ):
            return 0
        shared = range(max(layer_start, donor.layer_start), min(layer_end, donor.layer_end))
        for g in shared:
            layer = old.model.layers[g - donor.layer_start]
            for module in layer.modules():  # the KV cache is indexed by the stage-local index
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = g - layer_start
            stage.model.layers[g - layer_start] = layer
        edges = False
        if layer_start == 0 and donor.layer_start == 0:
            stage.model.embed_tokens, edges = old.model.embed_tokens, True
        if layer_end == num_layers and donor.layer_end == num_layers:
            stage.model.norm, stage.lm_head, edges = old.model.norm, old.lm_head, True
        if shared or edges:  # the donor's modules are the new stage's now: it must not compute
            donor._model = donor._config = None
            donor.layer_start = donor.layer_end = 0
        return len(shared)

