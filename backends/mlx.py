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

import functools
import importlib
import inspect
import logging
from typing import Any, cast

import numpy as np

from backends.base import Backend, BatchItem, Progress, StepOutput, check_range
from backends.mlx_batch import forward_decode_rows
from backends.mlx_wire import (  # noqa: F401  (this backend's surface)
    _NUMPY,
    DTYPE_NAMES,
    INSTALL_HINT,
    _mlx,
    array_to_wire,
    wire_to_array,
)
from mesh.errors import BackendError, ModelError
from mesh.models import Model, layer_of, range_names, sliced_config
from mesh.wire import WireTensor

log = logging.getLogger(__name__)

QUANTIZE = (None, "none", "int8", "int4")  # --quantize: None keeps the files' format
BITS = {"int8": 8, "int4": 4}
GROUP_SIZE = 64  # mlx-lm convert's default group size
DEVICES = ("cpu", "gpu")


def _mx_dtype(mx: Any, name: str) -> Any:
    return {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}[name]


def config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as the dict its config.json would be: ``to_dict()`` plus the
    names transformers maps onto its own (``attribute_map``, e.g. qwen3_moe's ``num_experts``
    for ``num_local_experts``), which mlx-lm's ``ModelArgs`` read, and ``head_dim`` where the
    config leaves it to be derived (hidden_size / num_attention_heads)."""
    out = config.to_dict()
    for alias in getattr(type(config), "attribute_map", {}) or {}:
        if out.get(alias) is None and getattr(config, alias, None) is not None:
            out[alias] = getattr(config, alias)
    if out.get("head_dim") is None and out.get("hidden_size") and out.get("num_attention_heads"):
        out["head_dim"] = int(out["hidden_size"]) // int(out["num_attention_heads"])
    return out


def mlx_args(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as mlx-lm's ``ModelArgs.from_dict`` reads it.

    transformers >= 5 writes ``rope_parameters`` and no top-level ``rope_theta``; mlx-lm reads
    only ``rope_theta`` and ``rope_scaling``. The base is copied to ``rope_theta`` and a
    non-default RoPE type to ``rope_scaling``.
    """
    out = dict(config)
    params = out.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        # per layer type (gemma3): mlx-lm reads the global base and the sliding layers' local one
        local = params.get("sliding_attention") or {}
        if "rope_local_base_freq" not in out and "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        params = params["full_attention"]
    if isinstance(params, dict) and "rope_theta" in params:
        if out.get("rope_theta") is None:
            out["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
            out["rope_scaling"] = dict(params)
    types = out.get("layer_types")
    if isinstance(types, list) and "full_attention" in types and "sliding_attention" in types:
        # mlx-lm's gemma3 takes the period of its full-attention layers, not the list
        out.setdefault("sliding_window_pattern", types.index("full_attention") + 1)
    return out


# mlx-lm classes whose forward picks a layer's kind by its stage-local index (gemma3_text's
# full-attention layers are every ``sliding_window_pattern``-th): a stage of them must start on
# that period and hold at least one period, or its layers would take the wrong masks
_PERIODIC = {"gemma3_text": "sliding_window_pattern"}


# mlx-lm classes that multiply ``input_embeddings`` by the embedding scale as they do token
# embeddings (gemma3_text: sqrt(hidden_size) rounded to bf16); transformers scales in the
# embedding module, so hidden states from another stage are already past it
_EMBED_SCALE: dict[str, Any] = {
    "gemma3_text": lambda mx, config: mx.array(int(config.hidden_size) ** 0.5, mx.bfloat16),
}


def _check_periodic(model_type: str, args: dict[str, Any], layer_start: int, layer_end: int) -> None:
    field = _PERIODIC.get(model_type)
    period = int(args.get(field, 1) or 1) if field else 1
    if period > 1 and (layer_start % period or layer_end - layer_start < period):
        raise ModelError(f"mlx-lm's {model_type} picks full-attention layers by stage-local index "
                         f"({field}={period}): an MLX stage must start at a multiple of {period} layers and "
                         f"hold at least {period}; [{layer_start}, {layer_end}) does not (the torch backend "
                         f"runs any split)")


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


def _safetensors_index(folder: Any) -> dict[str, Any]:
    """``{tensor name: file}`` over a directory's ``*.safetensors`` (headers only)."""
    from safetensors import safe_open

    where: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                where[key] = file
    return where


@functools.lru_cache(maxsize=4)
def _gguf_index(file: str, num_layers: int) -> tuple[str, Any, dict[str, str]]:
    """A GGUF file's architecture name, gguf-py's name table for it (``gguf.get_tensor_name_map``,
    the table llama.cpp's converter writes with: Hugging Face module name -> GGUF name) and
    ``{GGUF tensor name: GGUF type name}``. Kept: parsing a GGUF index takes seconds."""
    import gguf

    reader = gguf.GGUFReader(file)
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ModelError(f"GGUF architecture {arch_name!r} is not known to the gguf library")
    return arch_name, gguf.get_tensor_name_map(arch, num_layers), {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_names(model: Model, hf_names: Any) -> dict[str, str]:
    """``{Hugging Face name: GGUF array name}`` for those of ``hf_names`` (parameter names such as
    ``model.layers.0.mlp.down_proj.weight``) the GGUF file holds; a tensor MLX reads quantized
    (Q4_0 / Q4_1 / Q8_0) adds its ``scales`` and ``biases`` arrays under the module's name."""
    file = str(model.ref.path / str(model.ref.gguf_file))
    _, table, types = _gguf_index(file, int(model.config.num_hidden_layers))
    out: dict[str, str] = {}
    for hf in hf_names:
        module, _, suffix = hf.rpartition(".")
        base = table.get_name(module)
        if base is None or f"{base}.{suffix}" not in types:
            continue
        out[hf] = f"{base}.{suffix}"
        if types[f"{base}.{suffix}"] in ("Q4_0", "Q4_1", "Q8_0"):
            out[f"{module}.scales"] = f"{base}.scales"
            out[f"{module}.biases"] = f"{base}.biases"
    return out


def read_arrays(model: Model, wanted: dict[str, str], progress: Progress | None = None) -> dict[str, Any]:
    """``{stage name: mx.array}`` for ``wanted`` (``{stage name: file name}``), loaded with
    ``mx.load`` (lazy: read when evaluated). GGUF Q4_0 / Q4_1 / Q8_0 tensors come back
    quantized (MLX reads them natively: 32-element groups, ``weight`` / ``scales`` /
    ``biases``), Llama-family Q and K rows un-permuted from llama.cpp's RoPE layout; other
    GGUF types come back as float16 (MLX casts them)."""
    mx = _mlx()
    out: dict[str, Any] = {}
    total = len(wanted)
    if model.ref.gguf_file:
        file = str(model.ref.path / str(model.ref.gguf_file))
        arrays = mx.load(file)
        config = model.config
        arch_name = _gguf_index(file, int(config.num_hidden_layers))[0]
        to_gguf = gguf_names(model, set(wanted.values()))
        for i, (local, name) in enumerate(sorted(wanted.items())):
            value = arrays[to_gguf[name]]
            # llama.cpp permutes Llama's Q/K rows for its RoPE (transformers' LlamaTensorProcessor undoes it)
            if arch_name == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                heads = config.num_attention_heads if ".q_proj." in name else (
                    config.num_key_value_heads or config.num_attention_heads)
                value = _unpermute_rows(mx, value, int(heads))
            out[local] = value
            if progress:
                progress(i + 1, total)
        return out
    where = _safetensors_index(model.ref.path)
    by_file: dict[Any, list[tuple[str, str]]] = {}
    for local, name in wanted.items():
        by_file.setdefault(where[name], []).append((local, name))
    done = 0
    for file, pairs in by_file.items():
        arrays = mx.load(str(file))
        for local, name in pairs:
            out[local] = arrays[name]
            done += 1
            if progress:
                progress(done, total)
    return out


def _unpermute_rows(mx: Any, value: Any, heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (``LlamaModel.permute`` in its converter) on the
    rows of a weight (float or packed quantized) or of its scales/biases: within each head, rows
    ``[0, 2, 4, ..., 1, 3, 5, ...]`` go back to ``[0, 1, 2, ...]`` (transformers'
    ``reverse_permute_weights`` is the same map)."""
    rows = value.shape[0]
    rest = value.shape[1:]
    return value.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _global(name: str, layer_start: int) -> str:
    """A stage-local ``model.layers.N...`` name as the model's global one."""
    idx = layer_of(name + ".")
    return name if idx is None else name.replace(f"model.layers.{idx}.", f"model.layers.{idx + layer_start}.", 1)


def quantize_like(stage: Any, weights: dict[str, Any], quantization: Any, layer_start: int) -> None:
    """Make the modules of ``stage`` whose weights come quantized (a ``.scales`` beside the
    ``.weight``) quantized modules, with mlx-lm's own ``nn.quantize`` and the predicate of its
    ``load_model``: a per-module override in ``quantization`` (mlx-community config.json,
    keyed by global module path) wins, else the group size, bits and mode are read off the
    packed shapes (``mlx_lm.utils.infer_quant_config``)."""
    import mlx.nn as nn

    if not any(k.endswith(".scales") for k in weights):
        return
    from mlx_lm.utils import infer_quant_config

    quantization = dict(quantization) if isinstance(quantization, dict) else {}

    def predicate(path: str, module: Any) -> Any:
        override = quantization.get(_global(path, layer_start))
        if isinstance(override, (dict, bool)):
            return override
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(stage, group_size=int(quantization.get("group_size", 64)), bits=int(quantization.get("bits", 4)),
                mode=str(quantization.get("mode", "affine")), class_predicate=predicate)


class _Given:
    """Stands in for a stage's embedding lookup: returns the hidden states it was given."""

    def __init__(self, hidden: Any) -> None:
        self._hidden = hidden

    def __call__(self, _ids: Any) -> Any:
        return self._hidden


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

    @classmethod
    def unavailable(cls) -> str | None:
        import importlib.util

        missing = [name for name in ("mlx", "mlx_lm") if importlib.util.find_spec(name) is None]
        return f"needs {' and '.join(missing)}: {INSTALL_HINT}" if missing else None

    @classmethod
    def gguf_kept_bits(cls, *, dtype: str, device: str | None) -> dict[str, float]:
        """MLX reads GGUF Q4_0 / Q4_1 / Q8_0 natively, as affine groups of 32 with a float16
        scale and bias each (+1 bit per weight), whatever the compute dtype."""
        return {"Q4_0": 5.0, "Q4_1": 5.0, "Q8_0": 9.0}

    def __init__(self, device: str | None = None, dtype: str | None = None, quantize: str | None = None) -> None:
        super().__init__()
        if quantize not in QUANTIZE:
            raise BackendError(f"--quantize {quantize!r} is not known; valid: {[q for q in QUANTIZE if q]}")
        self.quantize = quantize
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
        self._embed_scale: Any = None  # what the class multiplies given hidden states by (_EMBED_SCALE)
        self.quantized = False  # the loaded stage holds quantized modules
        self.weight_bytes = 0  # bytes the loaded stage's arrays take (packed weights, scales and biases)

    # -- loading -----------------------------------------------------------------------
    def load(self, model: Model, layer_start: int, layer_end: int, progress: Progress | None = None) -> None:
        """Load layers [layer_start, layer_end) (plus embeddings / final norm / head where
        they belong), reading only those tensors, the way mlx-lm's own ``load_model`` does:
        the files' tensors (renumbered to stage-local layers) go through the architecture's
        ``sanitize`` (e.g. per-expert tensors stacked into one ``switch_mlp``), quantized ones
        (an mlx-community directory with ``quantization`` in config.json, or a GGUF's Q4_0 /
        Q4_1 / Q8_0 tensors) make their modules quantized with ``nn.quantize`` (group size and
        bits per module, per-layer overrides honoured), and float ones take the compute dtype.

        Raises BackendError (bad range, unknown model type) or ModelError (tensors missing
        from the files, or a range mlx-lm's class cannot build)."""
        import mlx.nn as nn
        from mlx.utils import tree_map

        mx = self._mx
        config = model.config
        num_layers = int(config.num_hidden_layers)
        check_range(layer_start, layer_end, num_layers)
        first, last = layer_start == 0, layer_end == num_layers
        sub = sliced_config(config, layer_start, layer_end)
        gguf = bool(model.ref.gguf_file)
        names = set() if gguf else set(_safetensors_index(model.ref.path))
        has_head = bool(gguf_names(model, ["lm_head.weight"])) if gguf else "lm_head.weight" in names
        tied = bool(getattr(config, "tie_word_embeddings", False))
        head_is_embeddings = last and (tied or not has_head)
        args_dict = mlx_args(config_dict(sub))
        args_dict["tie_word_embeddings"] = head_is_embeddings or not last  # no lm_head unless read
        arch = architecture(str(config.model_type))
        field = _PERIODIC.get(str(config.model_type))
        if field:  # the period is the whole model's, whatever the slice's first layer
            args_dict[field] = mlx_args(config_dict(config)).get(field, args_dict.get(field))
            if layer_start or not last:  # the whole model is always one mlx-lm model
                _check_periodic(str(config.model_type), args_dict, layer_start, layer_end)
        try:
            stage = arch.Model(arch.ModelArgs.from_dict(args_dict))  # parameters stay lazy: never evaluated
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"mlx-lm's {config.model_type!r} cannot build layers [{layer_start}, {layer_end}) "
                             f"as one stage: {exc!r}") from exc
        inner = getattr(stage, "model", None)
        if inner is None or not hasattr(inner, "layers") or len(inner.layers) != layer_end - layer_start:
            raise BackendError(f"mlx-lm's {config.model_type!r} model has no model.layers of this range")
        # the edges this stage holds: embeddings (first stage, or a head tied to them), final norm and head
        edges = ({"model.embed_tokens"} if first or head_is_embeddings else set()) | (
            {"model.norm", "lm_head"} if last else set())
        if gguf:  # the stage's own parameter names, mapped forward by gguf-py's table
            own = [_global(k, layer_start) for k, _ in _flat(stage.parameters())
                   if layer_of(k) is not None or k.rpartition(".")[0] in edges]
            if head_is_embeddings:
                own = [n for n in own if not n.startswith("lm_head.")] + ["model.embed_tokens.weight"]
            names = set(gguf_names(model, own))
        wanted = {local: name for local, name in range_names(names, layer_start, layer_end).items()
                  if layer_of(local) is not None or local.rpartition(".")[0] in edges}
        with mx.stream(self._device):
            weights = read_arrays(model, wanted, progress)
            if hasattr(stage, "sanitize"):  # on the whole stage class, as mlx-lm's load_model calls it
                weights = stage.sanitize(weights)
            if not first and not head_is_embeddings:
                inner.pop("embed_tokens", None)
            if not last:
                stage.pop("lm_head", None)
                inner.norm = nn.Identity()
            quantize_like(stage, weights, getattr(config, "quantization", None), layer_start)
            params = dict(_flat(stage.parameters()))
            if head_is_embeddings and "lm_head.weight" in params:  # a class that keeps its own head
                for part in ("weight", "scales", "biases"):
                    if f"model.embed_tokens.{part}" in weights:
                        weights[f"lm_head.{part}"] = weights[f"model.embed_tokens.{part}"]
            weights = {k: v for k, v in weights.items() if k in params}  # e.g. embeddings on a later stage
            missing = sorted(set(params) - set(weights))
            if missing:
                raise ModelError(f"tensors missing from the model files: {missing[:5]}")
            for key, value in weights.items():
                if mx.issubdtype(value.dtype, mx.floating) and value.dtype != self.dtype:
                    weights[key] = value.astype(self.dtype)  # quantized weights stay packed
            stage.load_weights(list(weights.items()), strict=False)
            if self.quantize == "none" and any(k.endswith(".scales") for k in weights):
                from mlx_lm.utils import dequantize_model

                stage = dequantize_model(stage)  # float weights asked for: unpack what the files hold
                stage.update(tree_map(lambda a: a.astype(self.dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                                      stage.parameters()))
            if self.quantize in BITS and any(k.endswith(".scales") for k in weights):
                log.info("--quantize %s: the model files are quantized already; their format is kept", self.quantize)
            elif self.quantize in BITS:
                # a float model quantized as it loads, as mlx-lm's convert does (its predicate)
                nn.quantize(stage, group_size=GROUP_SIZE, bits=BITS[self.quantize], class_predicate=lambda _p, m: (
                    hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP_SIZE == 0))
            stage.eval()  # inference mode, as mlx-lm's own loader sets it
            # every array the stage holds, private ones (RoPE tables) included, evaluated here
            mx.eval([v for _, v in _flat(stage) if isinstance(v, mx.array)])
        call = inspect.signature(inner.__call__).parameters
        with self._lock:
            self._model, self._config = stage, sub
            self.layer_start, self.layer_end, self.num_layers = layer_start, layer_end, num_layers
            self.set_dimensions(config)
            self._takes_embeddings = "input_embeddings" in call
            scale = _EMBED_SCALE.get(str(config.model_type))
            self._embed_scale = None if scale is None else scale(mx, config)
            self.weight_bytes = sum(v.nbytes for _, v in _flat(stage.parameters()))
            self.quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                                 or type(m).__name__.startswith("Quantized") for m in stage.modules())
        self._warm_up()
        log.info("mlx backend: loaded layers [%d, %d) of %d on %s (%s%s; weights %.1f MiB)", layer_start, layer_end,
                 num_layers, self.device, self.dtype_name, ", quantized weights" if self.quantized else "",
                 self.weight_bytes / 2**20)

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
                logits = self._head(stage)(out[:, -1, :]).astype(mx.float32)
                mx.eval(logits, [c.state for c in cache])
                return StepOutput(logits=np.array(logits[0], dtype=np.float32))

    @staticmethod
    def _head(stage: Any) -> Any:
        return stage.lm_head if "lm_head" in stage else stage.model.embed_tokens.as_linear

    def run_head(self) -> None:
        with self._lock:
            stage, mx = self._model, self._mx
            if stage is None or self.layer_end < self.num_layers:
                raise BackendError("no last stage loaded: it has no LM head")
            with mx.stream(self._device):
                x = stage.model.norm(mx.zeros((1, self.hidden_size or 0), dtype=self.dtype))
                mx.eval(self._head(stage)(x).astype(mx.float32))

    def _forward_batch(self, items: list[BatchItem]) -> list[StepOutput | BackendError]:
        """Decode steps of several requests in one call on mlx-lm's ``BatchKVCache``; the other
        items one after another (``backends.mlx_batch``)."""
        results = forward_decode_rows(self, items)
        rest = [i for i in range(len(items)) if results[i] is None]
        for i, out in zip(rest, super()._forward_batch([items[i] for i in rest]), strict=True):
            results[i] = out
        return results  # type: ignore[return-value]

    def _run(self, stage: Any, inputs: Any, embeds: Any, cache: list[Any]) -> Any:
        """The stage's ``model.model`` on token ids or hidden states (final norm included on
        the last stage, an identity elsewhere)."""
        inner = stage.model
        if embeds is None:
            return inner(inputs, cache)
        if self._takes_embeddings:
            if self._embed_scale is not None:  # the class scales what it is given: undo it first
                embeds = embeds / self._embed_scale.astype(embeds.dtype)
            return inner(None, cache, input_embeddings=embeds)
        # a class whose __call__ takes no input_embeddings (deepseek_v3, phi3): run its own
        # __call__ with an embedding lookup that hands back the given hidden states, so its
        # own masks and layer loop apply
        own = inner.get("embed_tokens") if hasattr(inner, "get") else None
        inner.embed_tokens = _Given(embeds)
        try:
            return inner(self._mx.zeros(embeds.shape[:2], dtype=self._mx.int32), cache)
        finally:
            if own is None:
                inner.pop("embed_tokens", None)
            else:
                inner.embed_tokens = own

