"""The contract of a distributed training algorithm in the gym (specs/gym.md G1-G4).

A ``Strategy`` is written for one node; the engine (``mesh/gym/engine.py``) runs it on every
node, in turn in one process or in one process per node on ``torch.distributed``. Per step the
engine computes the node's gradients (``p.grad`` of ``node.params``, float32), then:

1. ``step(node, t)`` updates the node locally and returns the tensors this node contributes to
   a collective at step ``t`` (its *payload*), or None when step ``t`` has no sync;
2. the engine runs the strategy's ``collective`` over the live nodes' payloads:
   ``"all-reduce"``: the element-wise mean of each payload tensor, summed in node order (so
   both engines compute the same bits); ``"all-gather"``: every live node's payload, in node
   order;
3. ``finish(node, t, result)`` applies the result.

``payload_bytes(shapes)`` states, in closed form, the bytes one node's payload has at a sync
(the tensors' ``nbytes``); the engine counts the real tensors' bytes and a test checks the two
agree. What the wire carries follows from the collective (ring all-reduce: 2 (k-1)/k x payload
per node; ring all-gather: (k-1) x payload per node; ``mesh/gym/simclock.py``).

A strategy registers under the entry-point group ``mesh.strategies`` (``name = "module:Class"``),
the same registry as backends and transports, so a new algorithm is one file and one line of
``pyproject.toml``. Options come from ``--option KEY=VALUE`` as keyword arguments; an unknown
one is a ``ConfigError`` naming the valid ones.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mesh.errors import ConfigError

COLLECTIVES = ("all-reduce", "all-gather")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
Shapes = Sequence[torch.Size]


@dataclass(eq=False)
class Node:
    """One simulated node: its id (0..n-1), model, parameters (``mesh.gym.model.parameters``
    order), the run's seed (the same on every node: strategies that must pick the same random
    coordinates everywhere derive their generators from it) and the strategy's own per-node
    state (optimizers, buffers)."""

    id: int
    model: Any
    params: list[torch.nn.Parameter]
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)


def optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> Any:
    """An inner optimizer by name: ``adamw`` (torch, betas 0.9/0.95 as DiLoCo's inner
    optimizer), ``sgd`` (plain, no momentum), or any optimizer class of the
    ``pytorch_optimizer`` library by its name (for example ``soap`` or ``shampoo``: second-order
    methods whose memory the gym's budget weighs), when that library is installed.
    ConfigError for an unknown name."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    try:
        from pytorch_optimizer import load_optimizer
    except ImportError:
        raise ConfigError(f"inner optimizer {name!r}: valid: adamw, sgd (more with pip install pytorch_optimizer)"
                          ) from None
    try:
        cls = load_optimizer(name)
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise ConfigError(f"inner optimizer {name!r} is not one of pytorch_optimizer's: {exc}") from None
    return cls(params, lr=lr, weight_decay=weight_decay)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value``, looking into lists, tuples and dicts (an optimizer's
    state keeps preconditioners in lists: SOAP's ``GG``, Shampoo's factors)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def optimizer_state_bytes(opt: Any) -> int:
    """Bytes of tensors an optimizer keeps per parameter (after at least one step)."""
    return sum(tensor_bytes(s) for s in opt.state.values())


class Strategy(ABC):
    """Base class of a training algorithm (see the module docstring).

    Class attributes: ``name`` (the registry name), ``paper`` (the citation of the algorithm),
    ``collective`` (one of ``COLLECTIVES``). Subclasses take their hyperparameters as keyword
    arguments with defaults; ``lr`` and ``inner`` (the node optimizer's name) are common.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    collective: ClassVar[str] = "all-reduce"

    def __init__(self, *, lr: float = 1e-3, inner: str = "adamw", weight_decay: float = 0.0) -> None:
        self.lr, self.inner, self.weight_decay = float(lr), inner, float(weight_decay)
        self._lr_scale = 1.0  # the run's learning-rate schedule at this step (set by the engine)

    @classmethod
    def create(cls, options: dict[str, str]) -> Strategy:
        """An instance from ``--option`` strings, each converted to its default's type.
        ConfigError for an unknown key or a value of the wrong kind."""
        defaults = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    defaults[p.name] = p.default
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in defaults:
                raise ConfigError(f"--option {key}: {cls.name} takes {', '.join(sorted(defaults))}")
            kind = type(defaults[key])
            if kind is bool:
                if raw.lower() not in BOOLEANS:
                    raise ConfigError(f"--option {key}={raw!r}: must be one of {', '.join(BOOLEANS)}")
                kwargs[key] = BOOLEANS[raw.lower()]
                continue
            try:
                kwargs[key] = kind(raw)
            except ValueError:
                raise ConfigError(f"--option {key}={raw!r}: must be a {kind.__name__}") from None
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ConfigError(f"--option: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """The hyperparameters in force (recorded with every run)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def new_optimizer(self, node: Node) -> Any:
        return optimizer(self.inner, node.params, lr=self.lr, weight_decay=self.weight_decay)

    def scheduled(self, scale: float) -> None:
        """The engine's learning-rate schedule: the node optimizers' rate is ``lr`` x ``scale``
        for the next step (``current_lr``; ``inner_step`` applies it)."""
        self._lr_scale = float(scale)

    @property
    def current_lr(self) -> float:
        return self.lr * self._lr_scale

    def inner_step(self, node: Node, key: str = "opt") -> None:
        """Step the node's optimizer ``node.state[key]`` at the scheduled rate."""
        opt = node.state[key]
        for group in opt.param_groups:
            group["lr"] = self.current_lr
        opt.step()

    @abstractmethod
    def setup(self, node: Node) -> None:
        """Create the node's optimizers and buffers in ``node.state`` (called once per node)."""

    @abstractmethod
    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        """After the backward pass of step ``t`` (0-based): update the node, return its payload
        when step ``t`` syncs, else None."""

    @abstractmethod
    def finish(self, node: Node, t: int, result: Any) -> None:
        """Apply a sync's result: a list of mean tensors (all-reduce) or a list of payloads,
        one per live node in node order (all-gather)."""

    @abstractmethod
    def payload_bytes(self, shapes: Shapes) -> int:
        """Bytes of one node's payload at a sync, for parameters of ``shapes`` (closed form)."""

    def syncs(self, t: int) -> bool:
        """Whether step ``t`` has a sync (every step unless overridden)."""
        return True

    def state_bytes(self, node: Node) -> int:
        """Bytes this strategy keeps per node beyond the weights and gradients (optimizers and
        buffers), measured on a node after ``setup`` and one step; the memory budget's share."""
        return sum(optimizer_state_bytes(v) if isinstance(v, torch.optim.Optimizer) else tensor_bytes(v)
                   for v in node.state.values())

    def evaluated(self, node: Node) -> list[torch.Tensor]:
        """The parameters this node offers for evaluation; the engine evaluates the mean over
        live nodes (the node's current parameters unless overridden)."""
        return [p.detach() for p in node.params]

    def export_state(self, node: Node) -> dict[str, Any]:
        """This node's parameters and state as plain tensors and optimizer ``state_dict``s
        (what a rejoining node receives from a live one; picklable, so it crosses processes)."""
        state: dict[str, Any] = {}
        for key, value in node.state.items():
            if isinstance(value, torch.optim.Optimizer):
                state[key] = ("optimizer", copy.deepcopy(value.state_dict()))
            elif isinstance(value, torch.Tensor):
                state[key] = ("tensor", value.detach().clone())
            elif isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
                state[key] = ("tensors", [v.detach().clone() for v in value])
        return {"params": [p.detach().clone() for p in node.params], "state": state}

    def rejoin(self, node: Node, exported: dict[str, Any]) -> None:
        """A node that failed comes back with a live node's ``export_state``, as a restarted
        worker loads the latest checkpoint: fresh ``setup``, then every tensor copied in place
        (so optimizers keep referring to this node's tensors) and every optimizer's state loaded."""
        with torch.no_grad():
            for mine, theirs in zip(node.params, exported["params"], strict=True):
                mine.copy_(theirs)
        node.state = {}
        self.setup(node)
        for key, (kind, value) in exported["state"].items():
            mine = node.state.get(key)
            if kind == "optimizer" and mine is not None:
                mine.load_state_dict(value)
            elif kind == "tensor" and isinstance(mine, torch.Tensor):
                mine.copy_(value)
            elif kind == "tensors" and isinstance(mine, list):
                for a, b in zip(mine, value, strict=True):
                    a.copy_(b)
            else:
                node.state[key] = value


def check_collective(cls: type[Strategy]) -> None:
    if getattr(cls, "collective", None) not in COLLECTIVES:
        raise ConfigError(f"strategy {cls.__name__}: collective must be one of {COLLECTIVES}")
