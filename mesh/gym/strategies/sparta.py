"""SPARTA: local AdamW on each node, and every step the mean of a small random fraction of the
parameters.

Beton, Baioumy, van der Ouderaa, Reed, Howes, Cheema, Vrabie 2025, "Improving the Efficiency
of Distributed Training using Sparse Parameter Averaging" (ICLR 2025 workshop; exo labs).
Each step every node picks the same ``ceil(p N)`` coordinates of the flattened parameters (a
generator seeded by the run's seed and the step, so no index travels) and replaces them by
their mean over the nodes; 0.05-0.5 % in the paper. Bytes per sync: one float32 per picked
coordinate, ``4 ceil(p N)``, every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mesh.gym.strategy import Node, Shapes, Strategy


class Sparta(Strategy):
    name = "sparta"
    paper = "Beton et al. 2025, Improving the Efficiency of Distributed Training using Sparse Parameter Averaging"
    collective = "all-reduce"

    def __init__(self, *, p: float = 0.005, lr: float = 1e-3, inner: str = "adamw", weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, inner=inner, weight_decay=weight_decay)
        if not 0 < p <= 1:
            raise ValueError(f"p must be a fraction in (0, 1], got {p}")
        self.p = p

    def setup(self, node: Node) -> None:
        node.state["opt"] = self.new_optimizer(node)

    def _picked(self, node: Node, t: int) -> torch.Tensor:
        n = sum(p.numel() for p in node.params)
        gen = torch.Generator().manual_seed(node.seed * 1_000_003 + t)
        return torch.randperm(n, generator=gen)[: math.ceil(self.p * n)]

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        self.inner_step(node)
        picked = self._picked(node, t)
        node.state["picked"] = picked
        return [parameters_to_vector(node.params).detach()[picked]]

    def finish(self, node: Node, t: int, result: Any) -> None:
        with torch.no_grad():
            flat = parameters_to_vector(node.params)
            flat[node.state.pop("picked")] = result[0]
            vector_to_parameters(flat, node.params)

    def payload_bytes(self, shapes: Shapes) -> int:
        return 4 * math.ceil(self.p * sum(s.numel() for s in shapes))
