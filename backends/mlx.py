"""The MLX backend: mlx-lm's own model classes, sliced to a layer range.

The stage module is ``mlx_lm.models.<model_type>.Model`` built from ``ModelArgs`` of a config
cut down to the stage's layers (``mesh.models.sliced_config``) and filled with only the
tensors of that range, so the math is mlx-lm's (attention, RoPE, masks, ``KVCache``) and no
model code is written here. Tensors come from ``Model.tensor_source()`` (Hugging Face names,
GGUF already dequantized) as torch tensors and become ``mx.array`` in the compute dtype.
Non-first stages drop the embeddings (kept on a last stage whose LM head is tied to them);
non-last stages drop the LM head and replace the final norm with an identity.

Shapes and dtypes: hidden states cross stages as ``WireTensor`` ``[1, n, hidden_size]`` in
the compute dtype (f32 by default on CPU, f16 on GPU; bf16 carried as its 16 bits,
little-endian), the same convention as ``backends.torch``, so torch and mlx stages can be
mixed in one pipeline. The last stage returns float32 logits ``[vocab_size]``. A cache is
mlx-lm's list of per-layer caches; a step must start at the position the cache has reached.

mlx and mlx-lm are imported when the backend is built, not when this module is imported, so
the plugin registers without them; building it then raises ``BackendError`` naming the
extra to install. Every array a stage keeps between calls (weights, cache) is evaluated
before the call returns: MLX refuses to evaluate a lazy graph on another thread than the one
that built it. Errors: ``BackendError`` (bad device, dtype, range or input), ``ModelError``
(tensors missing from the model files). Spec: specs/backend.md (B2-B6, B10).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, cast

import numpy as np

from backends.base import Backend, Progress, StepOutput, check_range, source_has
from mesh.errors import BackendError, ModelError
from mesh.models import Model, layer_of, sliced_config
from mesh.wire import WireTensor

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mesh-cluster[mlx]'"
DEVICES = ("cpu", "gpu")
DTYPE_NAMES = ("bf16", "f16", "f32")
_NUMPY: dict[str, np.dtype[Any]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}


def _mlx() -> Any:
    """``mlx.core``, or BackendError naming the extra that installs mlx and mlx-lm."""
    try:
        import mlx.core as mx
        import mlx_lm.models.cache  # noqa: F401  (checks mlx-lm is there too)
    except ImportError as exc:
        raise BackendError(f"the mlx backend needs mlx and mlx-lm ({exc}); install them: {INSTALL_HINT}") from exc
    return mx


def _mx_dtype(mx: Any, name: str) -> Any:
    return {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}[name]


def array_to_wire(a: Any) -> WireTensor:
    """A float ``mx.array`` (f32/f16/bf16) as a WireTensor (bf16 carried as its bits)."""
    mx = _mlx()
    names = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}
    if a.dtype not in names:
        raise BackendError(f"cannot send dtype {a.dtype}; valid: {sorted(DTYPE_NAMES)}")
    raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    data = np.asarray(raw).astype(_NUMPY[names[a.dtype]], copy=False).tobytes()
    return WireTensor(dtype=names[a.dtype], shape=tuple(a.shape), data=data)


def wire_to_array(w: WireTensor, dtype: Any, what: str = "hidden states") -> Any:
    """The inverse of ``array_to_wire``, cast to ``dtype`` (an mlx dtype)."""
    mx = _mlx()
    if w.dtype not in _NUMPY:
        raise BackendError(f"{what} must be f32, f16 or bf16, got {w.dtype}")
    arr = mx.array(np.frombuffer(w.data, dtype=_NUMPY[w.dtype]).reshape(w.shape))
    if w.dtype == "bf16":
        arr = arr.view(mx.bfloat16)
    return arr.astype(dtype)


def mlx_args(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as mlx-lm's ``ModelArgs.from_dict`` reads it.

    transformers >= 5 writes ``rope_parameters`` and no top-level ``rope_theta``; mlx-lm reads
    only ``rope_theta`` and ``rope_scaling``. The base is copied to ``rope_theta`` and a
    non-default RoPE type to ``rope_scaling``.
    """
    out = dict(config)
    params = out.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        if out.get("rope_theta") is None:
            out["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
            out["rope_scaling"] = dict(params)
    return out


def architecture(model_type: str) -> Any:
    """mlx-lm's module for ``model_type`` (after mlx-lm's own remapping table)."""
    try:
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        MODEL_REMAPPING = {}
    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError as exc:
        raise BackendError(f"mlx-lm has no model type {name!r} (from {model_type!r})") from exc


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``mlx.utils.tree_flatten`` as a list of (dotted name, leaf)."""
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, Any]], tree_flatten(tree))


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().to("cpu")
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class MlxBackend(Backend):
    """A pipeline stage run by mlx-lm on MLX.

    Args:
        device: ``cpu`` or ``gpu`` (Metal, or CUDA in a CUDA build of mlx); default: MLX's
            default device.
        dtype: compute dtype name (``f32``, ``f16``, ``bf16``); default f32 on CPU, f16 on GPU.

    Raises:
        BackendError: an unknown or unavailable device, an unknown dtype, or mlx / mlx-lm
            not installed (naming the extra to install).
    """

    name = "mlx"

    def __init__(self, device: str | None = None, dtype: str | None = None) -> None:
        super().__init__()
        if device is not None and device not in DEVICES:
            raise BackendError(f"--device {device!r} is not an mlx device; valid: {list(DEVICES)}")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise BackendError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPE_NAMES)}")
        mx = self._mx = _mlx()
        gpu = bool(mx.is_available(mx.gpu)) if hasattr(mx, "is_available") else bool(mx.metal.is_available())
        if device is None:
            device = "gpu" if gpu and mx.default_device().type == mx.gpu else "cpu"
        if device == "gpu" and not gpu:
            raise BackendError(f"--device 'gpu' is not available in this mlx build; usable: {['cpu']}")
        self.device = device
        self._device = mx.Device(mx.gpu if device == "gpu" else mx.cpu)
        self.dtype_name = dtype or ("f32" if device == "cpu" else "f16")
        self.dtype = _mx_dtype(mx, self.dtype_name)
        self.compute_dtype = self.dtype_name
        self._model: Any = None
        self._config: Any = None
        self._takes_embeddings = False

    # -- loading -----------------------------------------------------------------------
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        """Load layers [layer_start, layer_end) (plus embeddings / final norm / head where
        they belong), reading only those tensors. Raises BackendError (bad range, unknown
        model type) or ModelError (tensors missing from the files)."""
        import mlx.nn as nn
        from mlx.utils import tree_unflatten

        mx = self._mx
        config = model.config
        num_layers = int(config.num_hidden_layers)
        check_range(layer_start, layer_end, num_layers)
        first, last = layer_start == 0, layer_end == num_layers
        sub = sliced_config(config, layer_start, layer_end)
        source = model.tensor_source()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        head_is_embeddings = last and (tied or not source_has(source, "lm_head.weight"))
        args_dict = mlx_args(sub.to_dict())
        args_dict["tie_word_embeddings"] = head_is_embeddings or not last  # no lm_head unless read
        arch = architecture(str(config.model_type))
        stage = arch.Model(arch.ModelArgs.from_dict(args_dict))  # parameters stay lazy: never evaluated
        inner = getattr(stage, "model", None)
        if inner is None or not hasattr(inner, "layers") or len(inner.layers) != layer_end - layer_start:
            raise BackendError(f"mlx-lm's {config.model_type!r} model has no model.layers of this range")
        if not first and not head_is_embeddings:
            inner.pop("embed_tokens", None)
        if not last:
            stage.pop("lm_head", None)
            inner.norm = nn.Identity()
        wanted: dict[str, str] = {}  # local name -> global (file) name
        for local, _ in _flat(stage.parameters()):
            idx = layer_of(local)
            wanted[local] = local if idx is None else local.replace(
                f"model.layers.{idx}.", f"model.layers.{idx + layer_start}.", 1)
        if head_is_embeddings and "lm_head.weight" in wanted:  # a class that keeps its own head
            wanted["lm_head.weight"] = "model.embed_tokens.weight"
        total = len(set(wanted.values()))
        done = 0

        def step(_name: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        tensors = source.load(sorted(set(wanted.values())), on_tensor=step)
        with mx.stream(self._device):
            weights = {local: mx.array(_torch_to_numpy(tensors[src])).astype(self.dtype)
                       for local, src in wanted.items()}
            del tensors
            if hasattr(stage, "sanitize"):
                weights = stage.sanitize(weights)
            missing = sorted(set(wanted) - set(weights))
            if missing:
                raise ModelError(f"tensors missing from the model files: {missing[:5]}")
            stage.update(tree_unflatten(list(weights.items())))
            stage.eval()  # inference mode, as mlx-lm's own loader sets it
            # every array the stage holds, private ones (RoPE tables) included, evaluated here
            mx.eval([v for _, v in _flat(stage) if isinstance(v, mx.array)])
        call = inspect.signature(inner.__call__).parameters
        with self._lock:
            self._model, self._config = stage, sub
            self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, num_layers
            self.set_dimensions(config)
            self._takes_embeddings = "input_embeddings" in call
        self._warm_up()
        log.info("mlx backend: loaded layers [%d, %d) of %d on %s (%s)", layer_start, layer_end, num_layers,
                 self.device, self.dtype_name)

    def _drop_layers(self) -> None:
        self._model = self._config = None

    # -- compute -----------------------------------------------------------------------
    def new_cache(self) -> Any:
        """A fresh per-request cache: mlx-lm's list of per-layer caches for this stage."""
        from mlx_lm.models.cache import make_prompt_cache

        if self._model is None:
            raise BackendError("no layers loaded")
        return make_prompt_cache(self._model)

    def _held(self, cache: Any) -> int:
        """Positions ``cache`` holds; BackendError unless it is a cache of this stage."""
        if not isinstance(cache, list) or len(cache) != self.layer_end - self.layer_start:
            raise BackendError("the cache is not one of this stage's (use new_cache())")
        return int(cache[0].offset)

    def _kv_layers(self, cache: Any) -> list[Any]:
        from mlx_lm.models.cache import KVCache

        if any(type(c) is not KVCache for c in cache):
            raise BackendError("the mlx backend moves only full KV caches (mlx_lm KVCache per layer)")
        return list(cache)

    def _cached_positions(self, cache: Any) -> int:
        return self._held(cache)

    def _export_kv(self, cache: Any, *, start_pos: int, end_pos: int) -> list[tuple[int, WireTensor, WireTensor]]:
        """Keys and values of positions [start_pos, end_pos) (checked by ``Backend.export_kv``),
        per layer of this stage: ``(global layer index, keys, values)``, each
        ``[1, kv_heads, n, head_dim]`` in the compute dtype. Raises BackendError for a cache
        that is not made of full KV caches."""
        with self._lock:
            if self._model is None:  # unloaded since the checks
                raise BackendError("no layers loaded")
            with self._mx.stream(self._device):
                return [(self.layer_start + i, array_to_wire(c.keys[:, :, start_pos:end_pos, :].astype(self.dtype)),
                         array_to_wire(c.values[:, :, start_pos:end_pos, :].astype(self.dtype)))
                        for i, c in enumerate(self._kv_layers(cache))]

    def _import_kv(self, cache: Any, layers: list[tuple[int, WireTensor, WireTensor]]) -> None:
        """Append an ``export_kv`` output (layers and shapes checked by ``Backend.import_kv``)
        at the position ``cache`` has reached. Everything is converted before anything is
        appended: BackendError for a cache that is not this stage's or a dtype that is not
        f32, f16 or bf16."""
        with self._lock:
            if self._model is None:
                raise BackendError("no layers loaded")
            self._held(cache)
            caches = self._kv_layers(cache)
            mx = self._mx
            with mx.stream(self._device):
                arrays = [(wire_to_array(keys, self.dtype, "KV tensors"), wire_to_array(values, self.dtype, "KV tensors"))
                          for _, keys, values in layers]
                for c, (k, v) in zip(caches, arrays, strict=True):  # all converted first
                    c.update_and_fetch(k, v)
                mx.eval([c.state for c in caches])

    def _forward(
        self,
        cache: Any,
        *,
        start_pos: int,
        token_ids: list[int] | None = None,
        hidden: WireTensor | None = None,
    ) -> StepOutput:
        """Run this stage on positions ``start_pos .. start_pos+n-1`` (input checked by
        ``Backend.forward``). ``start_pos`` must equal the positions ``cache`` holds. Returns
        ``hidden`` ``[1, n, hidden_size]`` in the compute dtype, or on the last stage float32
        ``logits`` ``[vocab_size]`` at the last position. Raises BackendError for a cache
        that is not this stage's or a position that does not continue it.
        """
        with self._lock:
            stage = self._model
            if stage is None:  # unloaded since the checks
                raise BackendError("no layers loaded")
            mx = self._mx
            with mx.stream(self._device):
                inputs = embeds = None
                if token_ids is not None:
                    inputs = mx.array([token_ids], dtype=mx.int32)
                else:
                    assert hidden is not None  # Backend.forward gives exactly one of the two
                    embeds = wire_to_array(hidden, self.dtype)
                held = self._held(cache)
                if start_pos != held:
                    raise BackendError(f"start_pos {start_pos} does not continue the cache, which holds "
                                       f"positions [0, {held}); the next step must start at {held}")
                out = self._run(stage, inputs, embeds, cache)
                if self.layer_end < self.num_layers:
                    out = out.astype(self.dtype)
                    mx.eval(out, [c.state for c in cache])
                    return StepOutput(hidden=array_to_wire(out))
                last = out[:, -1, :]
                head = stage.lm_head if "lm_head" in stage else stage.model.embed_tokens.as_linear
                logits = head(last).astype(mx.float32)
                mx.eval(logits, [c.state for c in cache])
                return StepOutput(logits=np.array(logits[0], dtype=np.float32))

    def _run(self, stage: Any, inputs: Any, embeds: Any, cache: list[Any]) -> Any:
        """The stage's ``model.model`` on token ids or hidden states (final norm included on
        the last stage, an identity elsewhere)."""
        inner = stage.model
        if embeds is None:
            return inner(inputs, cache)
        if self._takes_embeddings:
            return inner(None, cache, input_embeddings=embeds)
        from mlx_lm.models.base import create_attention_mask

        # a class whose __call__ takes no input_embeddings: the loop mlx-lm's models run
        mask = create_attention_mask(embeds, cache[0])
        h = embeds
        for layer, c in zip(inner.layers, cache, strict=True):
            h = layer(h, mask, c)
        return inner.norm(h)

