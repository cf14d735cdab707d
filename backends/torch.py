"""The torch backend: transformers' own model classes, sliced to a layer range.

The stage module is ``AutoModelForCausalLM.from_config`` of a config cut down to the
stage's layers (``mesh.models.sliced_config``), built on the meta device and filled with
only the tensors of that range, so the math is transformers' (attention, RoPE, masks, KV
cache) and no model code is written here. Non-first stages drop the embeddings; non-last
stages drop the final norm and LM head. A backend can adopt the one it replaces and reuse
the layer modules both ranges share (``adopt_from``). Spec: specs/backend.md (B1-B6, B9).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.base import Backend, BatchItem, Progress, StepOutput, check_range, source_has
from backends.torch_batch import can_batch, forward_packed, new_packed_cache, use_packing
from backends.torch_quant import (  # noqa: F401  (INT4_GROUP: part of this backend's surface)
    INT4_GROUP,
    _format,
    _head_kind,
    _quantize,
    _quantized,
    resident_bytes,
)
from backends.torch_wire import TORCH_DTYPES, WIRE_NAMES, tensor_to_wire, wire_to_tensor  # noqa: F401  (this backend's surface)
from mesh.errors import BackendError, ModelError
from mesh.models import GGUFSource, Model, SafetensorsSource, layer_of, range_names, sliced_config
from mesh.wire import WireTensor

log = logging.getLogger(__name__)

QUANTIZE = (None, "none", "int8", "int4")  # --quantize: None keeps the files' format where torch runs it
# GGUF types a default load keeps quantized where torch runs them fast (``TorchBackend._kept_formats``):
# int4 in groups of INT4_GROUP holds Q4_0/Q4_1 exactly (block of 32, one scale and min); per-row int8 is
# the nearest format to Q8_0 (blocks of 32 with one scale each) that a CPU kernel runs
GGUF_KEPT = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
FORMAT_BITS = {"int4": 5.0, "int8": 8.0}  # bits per weight held: a 16-bit scale and zero per 32; one scale per row


class TorchBackend(Backend):
    """A pipeline stage run by transformers on torch (CPU, CUDA or MPS).

    Args:
        device: torch device string; default ``cuda`` when available, else ``cpu``.
        dtype: compute dtype name (``f32``, ``f16``, ``bf16``); default f32 on CPU, f16 on GPU.
    """

    name = "torch"
    logit_tolerance = 1e-4  # transformers' own modules: only the stage split differs

    def __init__(self, device: str | None = None, dtype: str | None = None, quantize: str | None = None) -> None:
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
        if quantize not in QUANTIZE:
            raise BackendError(f"--quantize {quantize!r} is not known; valid: {[q for q in QUANTIZE if q]}")
        if quantize == "int4" and self.device.type not in ("cuda", "cpu"):
            raise BackendError(f"--quantize int4 on the torch backend runs on cuda and cpu (torchao's int4 "
                               f"weight-only kernels), not on {self.device.type}; use --quantize int8 there, or "
                               "--backend mlx, which runs 4-bit weights on Apple silicon")
        if quantize in ("int8", "int4"):
            try:
                import torchao  # noqa: F401
            except ImportError as exc:
                raise BackendError(f"--quantize {quantize} needs torchao: pip install 'mesh-cluster[quant]'") from exc
        self.quantize = quantize if quantize != "none" else None
        self._keep_files = quantize is None  # GGUF Q4_0/Q4_1 weights stay int4 where that runs fast (load)
        self.weight_format = ""  # what the last load quantized: "", "int8" or "int4" (all or the files' Q4 tensors)
        self.weight_bytes = 0  # bytes the loaded stage's weights take in memory (quantized ones as stored)
        self._model: Any = None
        self._config: Any = None
        self._donor: TorchBackend | None = None  # offered by adopt_from, taken by the next load
        self._model_config: Any = None  # the loaded model's config object and id (reuse check)
        self._model_id = ""
        self.reused_layers = 0  # decoder layers the last load took from its donor
        self._packs = False  # whether batched steps run packed in one forward (backends.torch_batch)
        self._threads = torch.get_num_threads()  # intra-op threads for a lane alone (share_threads)

    def adopt_from(self, other: Backend) -> None:
        """Offer the layers of ``other`` to the next ``load`` (see ``Backend.adopt_from``).

        Accepted only from a loaded TorchBackend on the same device with the same dtype;
        ``load`` then also requires the same model (config object or model id) and ignores
        the offer otherwise. Nothing of ``other`` is touched here.

        Thread safety: ``load`` may run while ``other`` still serves a step on another thread.
        It takes ``other``'s lock while it clones the shared decoder layers (their weights
        shared, ``layer_idx`` renumbered to the layer's index in the new stage, which indexes
        the KV cache); ``other`` keeps serving with its own modules, and the shared weights
        are only read by both. ``load`` drops the reference to ``other`` whether it succeeds
        or fails.
        """
        self._donor = None
        if (isinstance(other, TorchBackend) and other is not self and other.loaded
                and other.device == self.device and other.dtype == self.dtype and other.quantize == self.quantize):
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
        if not first:
            stage.model.embed_tokens = None
        if not last:
            stage.model.norm = nn.Identity()
            stage.lm_head = None
        read = _fill(stage, model, layer_start, first=first, last=last, dtype=self.dtype, progress=progress)
        if last:
            read.update(_head_kind(model, stage, read))
        _rebuild_buffers(stage, sub)
        still_meta = sorted(_meta(stage))
        if still_meta:
            raise ModelError(f"tensors missing from the model files: {still_meta[:5]}")
        stage.to(self.device).eval()
        if self.quantize == "int4":
            _quantize(stage, "int4")
            if _fast_quantized(self.device.type, self.dtype):  # the head at 8 bits, as GGUF quantizers keep it at 6-8, where that is fast
                _quantize(stage, "int8", only={"lm_head.weight"})
        elif self.quantize:
            _quantize(stage, self.quantize)
        elif self._kept_formats():
            for how in ("int4", "int8"):
                only = {n for n, (kind, _, _) in read.items() if GGUF_KEPT.get(kind) == how}
                if only:
                    _quantize(stage, how, only=only)
        _log_dequantized(read, stage, self.dtype)
        held = sorted({_format(m.weight) for m in stage.modules() if isinstance(m, nn.Linear)} - {""})  # reused too
        self.weight_format = "+".join(held)
        with self._lock:
            self._model, self._config = stage, sub
            self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, num_layers
            self.set_dimensions(config)
            self._cache_kw = "cache" if "cache" in inspect.signature(stage.model.forward).parameters else "past_key_values"
            self._model_config, self._model_id = config, model.model_id
            self.reused_layers = reused
            self.weight_bytes = resident_bytes(stage)
            self._packs = can_batch(stage.config)
            if self._packs:
                use_packing(stage)
        self._warm_up()
        log.info("torch backend: loaded layers [%d, %d) of %d on %s (%d reused, %d read), weights %.1f MiB%s",
                 layer_start, layer_end, num_layers, self.device, reused, layer_end - layer_start - reused,
                 self.weight_bytes / 2**20, f", {self.weight_format} weight-only" if self.weight_format else "")

    def _kept_formats(self) -> bool:
        """Whether a load with the default ``--quantize`` keeps a GGUF's Q4_0/Q4_1 linear weights as
        int4 and its Q8_0 ones as per-row int8 (``GGUF_KEPT``; a tied head counts as its
        embeddings' type, which stay float for the lookup): where that is fast
        (``_fast_quantized``) and torchao is installed; elsewhere they are dequantized."""
        return self._keep_files and _keeps_gguf(self.device.type, self.dtype)

    @classmethod
    def gguf_kept_bits(cls, *, dtype: str, device: str | None) -> dict[str, float]:
        """``GGUF_KEPT`` at ``FORMAT_BITS`` where a default load keeps them (``_kept_formats``)."""
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if not _keeps_gguf(kind, TORCH_DTYPES.get(dtype)):
            return {}
        return {gguf_type: FORMAT_BITS[fmt] for gguf_type, fmt in GGUF_KEPT.items()}

    def _drop_layers(self) -> None:
        self._model = self._config = None

    # -- compute -----------------------------------------------------------------------
    def new_cache(self) -> Any:
        from transformers import DynamicCache

        if self._config is None:
            raise BackendError("no layers loaded")
        if self._packs:
            return new_packed_cache(self._config)
        return DynamicCache(config=self._config)

    def _cached_positions(self, cache: Any) -> int:
        return int(cache.get_seq_length()) if len(cache.layers) else 0

    @torch.inference_mode()
    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        with self._lock.shared():  # one cache; steps on others may run meanwhile (B17)
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
        with self._lock.shared():  # one cache; steps on others may run meanwhile (B17)
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
            if self._packs:  # the batched path's attention, so a request computes the same in any batch
                out = forward_packed(self, [BatchItem(cache=cache, start_pos=start_pos, token_ids=token_ids,
                                                      hidden=hidden)])[0]
                if isinstance(out, BackendError):
                    raise out
                return out
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


    @torch.inference_mode()
    def run_head(self) -> None:
        with self._lock:
            model = self._model
            if model is None or self.layer_end < self.num_layers:
                raise BackendError("no last stage loaded: it has no LM head")
            x = torch.zeros(1, 1, self.hidden_size or 0, dtype=self.dtype, device=self.device)
            model.lm_head(model.model.norm(x)[:, -1, :]).float().cpu()

    @torch.inference_mode()
    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        """Several requests' steps in one forward, packed end to end (``backends.torch_batch``);
        a stage whose attention layout does not pack runs them one after another."""
        if not self._packs:
            return super()._forward_batch(items)
        with self._lock.shared():  # spec B17: two lanes' batches may run at once on their own caches
            if self._model is None:
                raise BackendError("no layers loaded")
            return forward_packed(self, items)

    @property
    def concurrent_steps(self) -> bool:
        """B17: a packing stage on a CPU runs two batches at once (each request's attention on
        its own cache, the modules only read); measured there only."""
        return self._packs and self.device.type == "cpu"

    def share_threads(self, lanes: int, *, lane: bool = False) -> None:
        """B17: torch's intra-op threads for the calling thread (an OpenMP setting of each thread,
        taken from the process-wide one on its first use). The prefill lane's thread computes on
        one, always; the stage's own thread on the rest of the cores while the lane computes, on
        all of them alone. Why never two threads of the process with a pool each: libgomp counts
        every pool's threads, idle ones included, and once they outnumber the cores every pool
        stops spinning between parallel regions, for the life of the process; a decode step of
        the default model then measured 40-48 ms against 21-23 ms (AMD EPYC, 2 cores,
        2026-12-06), also after the second pool had gone idle."""
        if self.device.type == "cpu":
            want = 1 if lane else max(1, self._threads - (max(1, lanes) - 1))
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)


def _fast_quantized(device_type: str, dtype: torch.dtype | None) -> bool:
    """Whether a stage computes in bf16 on a CPU, the one place here where the CPU's quantized
    kernels beat float: with f32 activations int4 decodes at 7.3 against 17.5 tok/s for f32
    (README "Models") and int8 takes 11.9 against 9.7 ms for SmolLM2's 49152x576 head, where
    in bf16 it takes 1.5 against 3.2 ms (AMD EPYC, 2026-12-05); on CUDA these paths have not
    been measured."""
    return device_type == "cpu" and dtype == torch.bfloat16


def _keeps_gguf(device_type: str, dtype: torch.dtype | None) -> bool:
    import importlib.util

    return _fast_quantized(device_type, dtype) and importlib.util.find_spec("torchao") is not None


def _take_layers(donor: TorchBackend, model: Model, stage: Any, layer_start: int, layer_end: int) -> int:
    """Put the modules ``donor`` shares with the meta ``stage`` into ``stage``, sharing their
    weights; returns how many decoder layers it shared. ``donor`` keeps computing (a plan
    change loads the new stage beside the old one, spec B9): its decoder layers are cloned
    (``_share``) because the clone's ``layer_idx`` must be the layer's index in the new stage;
    the embeddings, final norm and head hold no index and are the donor's own modules."""
    num_layers = int(model.config.num_hidden_layers)
    with donor._lock:
        old = donor._model
        if old is None or donor.num_layers != num_layers or not (
            donor._model_config is model.config or donor._model_id == model.model_id
        ):
            return 0
        shared = range(max(layer_start, donor.layer_start), min(layer_end, donor.layer_end))
        for g in shared:
            layer = _share(old.model.layers[g - donor.layer_start])
            for module in layer.modules():  # the KV cache is indexed by the stage-local index
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = g - layer_start
            stage.model.layers[g - layer_start] = layer
        if layer_start == 0 and donor.layer_start == 0:
            stage.model.embed_tokens = old.model.embed_tokens
        if layer_end == num_layers and donor.layer_end == num_layers:
            stage.model.norm, stage.lm_head = old.model.norm, old.lm_head
        return len(shared)


def _share(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree that holds the very same tensors (parameters, buffers
    and tensors kept as plain attributes, e.g. ``_Int4CpuLinear.packed``): no weight is copied.
    ``copy.deepcopy`` with every reachable tensor pre-seeded in its memo (its documented way to
    keep objects shared) does the walk, so any module class copies the way it pickles."""
    memo: dict[int, Any] = {}

    def seed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            memo[id(value)] = value
        elif isinstance(value, dict):
            for item in value.values():
                seed(item)
        elif isinstance(value, list | tuple):
            for item in value:
                seed(item)

    for sub in module.modules():
        seed(vars(sub))
    return copy.deepcopy(module, memo)


def _meta(module: Any) -> set[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device."""
    return {n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta}


def _fill(stage: Any, model: Model, layer_start: int, *, first: bool, last: bool, dtype: torch.dtype,
          progress: Progress | None) -> dict[str, tuple[str, int, int]]:
    """Read the tensors ``stage`` (a meta-device model of the stage's layers) still lacks from
    the model's files, through transformers' own loader: ``convert_and_load_state_dict_in_model``
    with the architecture's registered weight conversions (``get_model_conversion_mapping``:
    per-expert tensors fused into one, renamed keys), the code ``from_pretrained`` runs. File
    names are renumbered to stage-local layers first (``range_names``). A GGUF file is read
    dequantized under the names transformers' GGUF loader gives it (``GGUFSource``).

    Returns, for a GGUF file, ``{stage tensor name: (GGUF type, bytes in the file, elements)}``
    of the quantized tensors it read (empty otherwise). Raises ModelError naming tensors the
    files lack or whose shapes differ from the config's.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and first and last:  # one tensor for both; one of them may come from the donor
        embed, head = stage.model.embed_tokens, stage.lm_head
        if embed.weight.is_meta and not head.weight.is_meta and not _quantized(head.weight):
            embed.weight = head.weight  # (a quantized head cannot serve the lookup: the file's is read)
        elif head.weight.is_meta and not embed.weight.is_meta:
            head.weight = embed.weight
    buffers = {n for n, _ in stage.named_buffers()}
    missing = _meta(stage) - buffers
    if not missing:
        return {}  # every module reused from the donor
    source = model.tensor_source()
    global_layers = [i + layer_start for n in missing if (i := layer_of(n)) is not None]
    head_from_embeddings = last and "lm_head.weight" in missing and (tied or not source_has(source, "lm_head.weight"))
    edges = any(layer_of(n) is None for n in missing)
    if isinstance(source, SafetensorsSource):
        names = range_names(source.names(), layer_start, layer_start + len(stage.model.layers), layers=global_layers,
                            edges=edges)
    else:  # GGUF: names are mapped on demand, so ask for the stage's own (dense layouts only)
        names = {n: (n.replace(f"model.layers.{i}.", f"model.layers.{i + layer_start}.", 1) if (i := layer_of(n))
                     is not None else n) for n in missing if not (n == "lm_head.weight" and head_from_embeddings)}
    if head_from_embeddings and not first:  # the head is the embeddings (a first stage ties them below)
        names["lm_head.weight"] = "model.embed_tokens.weight"
    total, done = len(names), 0

    def step(_name: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    load = LoadStateDictConfig(dtype=dtype, dtype_plan=stage._get_dtype_plan(dtype),
                               weight_mapping=get_model_conversion_mapping(stage))
    with (source.lazy(set(names.values()), on_tensor=step) if isinstance(source, SafetensorsSource)
          else nullcontext(source.load(set(names.values()), on_tensor=step))) as tensors:
        state = {local: tensors[file] for local, file in names.items()}
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(stage, state, load)
    if progress and done < total:
        progress(total, total)  # names the loader had no module for were never read
    if info.mismatched_keys or info.conversion_errors:
        bad = sorted(info.mismatched_keys)[:3] or sorted(info.conversion_errors.items())[:3]
        raise ModelError(f"the model files do not fit its config: {bad}")
    if first and last and stage.lm_head.weight.is_meta and (tied or not source_has(source, "lm_head.weight")):
        stage.lm_head.weight = stage.model.embed_tokens.weight  # one tensor for both
    buffers = {n for n, _ in stage.named_buffers()}
    still = sorted(n for n in _meta(stage) if n not in buffers)
    if still:
        raise ModelError(f"tensors missing from the model files: {still[:5]}")
    if not isinstance(source, GGUFSource):
        return {}
    quantized = source.quantized(set(names.values()))
    return {local: quantized[file] for local, file in names.items() if file in quantized}


def _log_dequantized(read: dict[str, tuple[str, int, int]], stage: Any, dtype: torch.dtype) -> None:
    """One log line for the GGUF tensors of ``read`` (``_fill``'s) that ``stage`` holds in
    float: their types, what they take in memory now (elements in ``dtype``) and what they
    took in the file."""
    seen: set[int] = set()  # a tied head is the embeddings' tensor: counted once
    rest = []
    for name in read:
        param = _param(stage, name)
        if param is None or (not _quantized(param) and id(param) not in seen):
            seen.add(id(param))
            rest.append(read[name])
    if rest:
        log.info("GGUF %s tensors dequantized to %s: %.1f MiB in memory for %.1f MiB in the file (torch keeps "
                 "Q4_0/Q4_1 as int4 and Q8_0 linears as int8 only with --dtype bf16 on a CPU and torchao; embeddings "
                 "stay float for the lookup; --backend mlx keeps Q4_0/Q4_1/Q8_0 quantized)",
                 "/".join(sorted({kind for kind, _, _ in rest})), WIRE_NAMES[dtype],
                 sum(e for _, _, e in rest) * torch.empty((), dtype=dtype).element_size() / 2**20,
                 sum(b for _, b, _ in rest) / 2**20)


def _param(stage: Any, name: str) -> Any:
    """The stage's parameter ``name``, or None where the stage has none by that name."""
    try:
        return stage.get_parameter(name)
    except AttributeError:
        return None


def _rebuild_buffers(stage: Any, config: Any) -> None:
    """Compute the buffers no checkpoint holds (RoPE inverse frequencies, embedding scales:
    non-persistent, computed at init from the config) off the meta device, the way
    ``from_pretrained`` does: empty tensors, then transformers' ``initialize_weights``, which
    initializes only what no load marked initialized (``_is_hf_initialized``)."""
    meta = [(name, b) for name, b in stage.named_non_persistent_buffers() if b.is_meta]
    for name, buffer in meta:
        parent, _, attr = name.rpartition(".")
        (stage.get_submodule(parent) if parent else stage)._buffers[attr] = torch.empty_like(buffer, device="cpu")
    if meta:
        stage.initialize_weights()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loader draws a progress bar per load; a node reports its own progress."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
