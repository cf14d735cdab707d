"""One CBOR safety rule set (mesh/wire.py ``check_cbor_safe``) for the kernel and framing: the
shared rules, the parameters where the layers differ, and each layer's own error type."""

from __future__ import annotations

import math
from collections import OrderedDict
from enum import IntEnum
from typing import Any

import pytest

from mesh import wire
from mesh.errors import FrameError, KernelError, MeshError
from mesh.kernel import events
from mesh.wire import MAX_SMALL_INT, MIN_SMALL_INT, UnsafeValueError, check_cbor_safe
from transports import framing


class Color(IntEnum):
    RED = 1


class Text(str):
    pass


def deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


SAFE_EVERYWHERE = [None, True, 0, -1, MIN_SMALL_INT, MAX_SMALL_INT, 1.5, -0.0, "", "x", b"", b"\x00",
                   [], {}, [1, [2, {"a": None}]], {"k": {"j": [b"v"]}}, Color.RED, Text("sub"),
                   OrderedDict(a=1), deep(31)]
UNSAFE_EVERYWHERE = [{1: "x"}, {"a": [{b"k": 1}]}, {1, 2}, frozenset(), object(), {"a": [object()]},
                     deep(65), complex(1, 2)]


@pytest.mark.parametrize("value", SAFE_EVERYWHERE)
def test_values_safe_for_every_layer(value: Any) -> None:
    check_cbor_safe(value, max_depth=32)
    events.check_cbor_safe(value)
    framing.check_cbor_safe(value)


@pytest.mark.parametrize("value", UNSAFE_EVERYWHERE)
def test_values_unsafe_for_every_layer_and_each_layers_error(value: Any) -> None:
    with pytest.raises(UnsafeValueError):
        check_cbor_safe(value, max_depth=64, allow_tuples=True, allow_bignums=True, allow_non_finite=True)
    with pytest.raises(KernelError):
        events.check_cbor_safe(value)
    with pytest.raises(FrameError):
        framing.check_cbor_safe(value, allow_tuples=True)


@pytest.mark.parametrize(("value", "flag"), [
    ((1, 2), "allow_tuples"), ({"a": [(1, (2,))]}, "allow_tuples"),
    (MAX_SMALL_INT + 1, "allow_bignums"), (MIN_SMALL_INT - 1, "allow_bignums"), ({"a": [2**200]}, "allow_bignums"),
    (math.nan, "allow_non_finite"), ({"a": [math.inf]}, "allow_non_finite"), (-math.inf, "allow_non_finite"),
])
def test_each_parameter_allows_only_its_own_kind(value: Any, flag: str) -> None:
    with pytest.raises(UnsafeValueError):
        check_cbor_safe(value, max_depth=8)
    check_cbor_safe(value, max_depth=8, **{flag: True})
    others = {"allow_tuples", "allow_bignums", "allow_non_finite"} - {flag}
    with pytest.raises(UnsafeValueError):
        check_cbor_safe(value, max_depth=8, **dict.fromkeys(others, True))


def test_the_kernel_is_strict_and_framing_carries_any_int_and_float() -> None:
    # spec K: a state value must equal itself after a round trip; a link carries what it is given
    for value in ({"a": 2**64}, {"a": math.nan}, {"a": (1, 2)}):
        with pytest.raises(KernelError):
            events.check_cbor_safe(value)
    framing.check_cbor_safe({"a": 2**64, "b": math.nan, "c": -math.inf})
    framing.check_cbor_safe({"a": (1, 2)}, allow_tuples=True)
    with pytest.raises(FrameError, match="tuple is not CBOR-safe"):
        framing.check_cbor_safe({"a": (1, 2)})


def test_depth_limits_are_inclusive_per_layer() -> None:
    events.check_cbor_safe({"a": deep(events.MAX_PAYLOAD_DEPTH - 1)})
    with pytest.raises(KernelError, match=r"payload\['a'\](\[0\])*: nested deeper than 32 levels"):
        events.check_cbor_safe({"a": deep(events.MAX_PAYLOAD_DEPTH)})
    framing.check_cbor_safe({"a": deep(framing.MAX_BODY_DEPTH - 1)})
    with pytest.raises(FrameError, match="deeper than 64"):
        framing.check_cbor_safe({"a": deep(framing.MAX_BODY_DEPTH)})
    with pytest.raises(FrameError, match="deeper"):
        framing.check_cbor_safe({"a": deep(100_000)})  # no recursion past the limit
    with pytest.raises(UnsafeValueError, match="deeper than 3"):
        check_cbor_safe([[1]], max_depth=3, depth=2)  # depth: where the value sits in a larger one


def test_messages_name_the_path_and_what_is_valid() -> None:
    with pytest.raises(UnsafeValueError, match=r"^body\['a'\]\[1\]: a set is not CBOR-safe; valid: None, bool"):
        check_cbor_safe({"a": [1, {2}]}, max_depth=8, where="body")
    with pytest.raises(UnsafeValueError, match=r"map key 7 is a int; map keys must be strings"):
        check_cbor_safe({"a": {7: 1}}, max_depth=8)
    with pytest.raises(UnsafeValueError, match=r"integer out of the 64-bit CBOR range"):
        check_cbor_safe([2**64], max_depth=8)
    with pytest.raises(UnsafeValueError, match=r"float nan is not finite"):
        check_cbor_safe([math.nan], max_depth=8)
    with pytest.raises(KernelError, match=r"^value of 'k': a tuple"):
        events.check_cbor_safe((1,), "value of 'k'")
    assert issubclass(UnsafeValueError, MeshError) and wire.check_cbor_safe is check_cbor_safe
