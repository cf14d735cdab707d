"""Weight formats of the torch backend: torchao's weight-only int8/int4 quantization of a
stage's linear layers, the CPU linears that call aten's kernels directly, and what a
module's tensors hold (format, resident bytes). Spec: specs/backend.md (B15)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backends.base import source_has
from mesh.models import GGUFSource, Model

INT4_GROUP = 32  # weights per int4 scale/zero pair: the block of GGUF Q4_0/Q4_1, whose grid it then holds exactly


def _quantize(stage: Any, how: str, only: set[str] | None = None) -> None:
    """Weight-only quantization of the stage's ``nn.Linear`` layers with torchao's own configs
    (``quantize_``): int8 per output channel, symmetric (``Int8WeightOnlyConfig``: CPU and CUDA),
    or int4 in groups of ``INT4_GROUP`` weights with a 16-bit scale and zero point each (5 bits
    per weight): on CUDA ``Int4WeightOnlyConfig`` tile-packed, on a CPU torchao's
    ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``; torchao 0.18's stable int4 config
    has no CPU packing); int4 takes only the linears ``_int4_packable`` names. On a CPU the
    quantized linears then call aten's kernels directly (``_direct_cpu_kernels``). Activations,
    hidden states on the wire and the KV cache stay in the compute dtype. Fused expert tensors
    of MoE layers are not ``nn.Linear`` and stay in the compute dtype (torchao's weight-only
    configs quantize linear layers). With ``only`` (parameter names, e.g.
    ``model.layers.0.mlp.up_proj.weight``), only the linears whose weight is named there; a
    linear quantized already (reused from a donor) is skipped."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    device = next(iter(stage.parameters())).device
    if how == "int8":
        config: Any = Int8WeightOnlyConfig()
    elif device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        config = PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP)
    else:
        config = Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
    packable = (lambda _m, _n: True) if how == "int8" else _int4_packable

    def chosen(module: Any, name: str) -> bool:
        return (isinstance(module, nn.Linear) and packable(module, name) and not _quantized(module.weight)
                and (only is None or f"{name}.weight" in only))

    quantize_(stage, config, filter_fn=chosen)
    if device.type == "cpu":
        _direct_cpu_kernels(stage)


class _Int4CpuLinear(nn.Linear):
    """A linear layer holding torchao's CPU int4 weight (``Int4OpaqueTensor``: packed int4
    ``qdata``, ``scale_and_zero`` of shape ``(in/group, out, 2)``) that calls aten's
    ``_weight_int4pack_mm_for_cpu`` itself, with the arguments torchao's own linear passes.

    Why not torchao's dispatch: it reaches the same kernel through a tensor-subclass
    ``__torch_function__`` (so does reading the weight's attributes, hence ``packed``, read
    once) that measured 22 us of Python per call (AMD EPYC, torch 2.13,
    torchao 0.18, 2026-12-05), 4.7 ms of a 21 ms SmolLM2-135M decode step with 210 such calls.
    The format, packing and kernel stay torchao's and aten's."""

    packed: tuple[torch.Tensor, int, torch.Tensor]  # the weight's qdata, group size, scale_and_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qdata, group, scale_and_zero = self.packed
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), qdata, group,
                                                        scale_and_zero)
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class _Int8CpuLinear(nn.Linear):
    """A linear layer holding torchao's weight-only int8 weight (``Int8Tensor``: int8 ``qdata``
    of shape ``(out, in)``, one f32 ``scale`` per output row, zero points 0) that runs aten's CPU
    weight-only int8 kernel ``_weight_int8pack_mm`` with the scales in the activations' dtype
    (``int8_scales``, a buffer of ``out`` elements).

    Why not torchao's dispatch: torchao 0.18 dequantizes the whole matrix on every call on a
    CPU: 22 ms against 3.2 ms in bf16 for SmolLM2's 49152x576 head, where aten's kernel takes
    1.0-1.5 ms (AMD EPYC, torch 2.13, 2026-12-05). Used in bf16 only: with f32 activations
    aten's kernel took the default model's 64-token prefill from 0.2 to 3.1 s (formats
    benchmark at bed64ba), so an f32 int8 stage keeps torchao's dispatch."""

    qdata: torch.Tensor  # the weight's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.int8_scales if self.int8_scales.dtype == x.dtype else self.int8_scales.to(x.dtype)
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.qdata, scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _direct_cpu_kernels(stage: Any) -> None:
    """Turn the CPU linears whose weight torchao quantized (weight-only, per-row symmetric int8
    in bf16, or int4 without activation scaling) into ``_Int8CpuLinear`` / ``_Int4CpuLinear``, which call
    aten's kernels directly; anything else keeps torchao's dispatch."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor

    for module in stage.modules():
        if type(module) is not nn.Linear or module.weight.device.type != "cpu":
            continue
        weight = module.weight
        if (isinstance(weight, Int4OpaqueTensor) and weight.act_mapping_type is None
                and weight.act_pre_scale is None and weight.block_size[0] == 1):
            module.packed = (weight.qdata, int(weight.block_size[1]), weight.scale_and_zero)  # read once: a
            module.__class__ = _Int4CpuLinear  # subclass's attributes go through __torch_function__
        elif (isinstance(weight, Int8Tensor) and weight.dtype == torch.bfloat16  # f32: aten's kernel prefills
              and weight.act_quant_kwargs is None and weight.act_pre_scale is None  # 15x slower than torchao's
              and list(weight.block_size) == [1, module.in_features]
              and (weight.zero_point is None or not bool(weight.zero_point.any()))):
            module.register_buffer("int8_scales", weight.scale.reshape(-1).to(module.weight.dtype).contiguous(),
                                   persistent=False)
            module.qdata = weight.qdata
            module.__class__ = _Int8CpuLinear


def _quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a quantized tensor subclass (torchao's) rather than a plain one."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) or type(tensor.data) is not torch.Tensor


def _format(tensor: Any) -> str:
    """``int8``, ``int4`` or ``""`` (float) for a linear layer's weight (torchao's tensor types)."""
    if not _quantized(tensor):
        return ""
    from torchao.quantization import Int8Tensor

    return "int8" if isinstance(tensor, Int8Tensor) else "int4"


def _head_kind(model: Model, stage: Any, read: dict[str, tuple[str, int, int]]) -> dict[str, tuple[str, int, int]]:
    """``{"lm_head.weight": (GGUF type, bytes, elements)}`` for a last stage's output head still
    in float whose file tensor (its own, or the embeddings' it is tied to) is quantized in a
    GGUF, even where the head was not read (tied to embeddings read or reused); else ``{}``."""
    source = model.tensor_source()
    if not isinstance(source, GGUFSource) or "lm_head.weight" in read or _quantized(stage.lm_head.weight):
        return {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    file = "lm_head.weight" if not tied and source_has(source, "lm_head.weight") else "model.embed_tokens.weight"
    kind = source.quantized({file}).get(file)
    return {"lm_head.weight": kind} if kind else {}


def _int4_packable(module: Any, name: str) -> bool:
    """The linear layers of the decoder layers that torchao's int4 packings take:
    ``in_features`` a multiple of ``INT4_GROUP`` and ``out_features`` of 16 (aten's
    ``_convert_weight_to_int4pack``). The output head is not: GGUF quantizers keep it at 6-8
    bits, and ``--quantize int4`` makes it int8 where that is fast (``_fast_quantized``)."""
    return (isinstance(module, nn.Linear) and not name.endswith("lm_head")
            and module.in_features % INT4_GROUP == 0 and module.out_features % 16 == 0)


def resident_bytes(module: Any) -> int:
    """Bytes the parameters and buffers of ``module`` take, a tensor shared by two names (a
    tied head) once; a quantized tensor subclass (torchao) counts its inner tensors (packed
    weights, scales), not its nominal dtype."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in seen or tensor.is_meta:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: Any) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return int(data.numel() * data.element_size())
