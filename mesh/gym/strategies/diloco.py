"""DiLoCo: inner AdamW on each node; every ``h`` steps the mean pseudo-gradient (global minus
local parameters) feeds an outer SGD with Nesterov momentum.

Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models"
(arXiv:2311.08105), algorithm 1: inner AdamW, outer Nesterov momentum 0.9, outer learning rate
0.7, H = 500 in the paper (smaller here: the runs are shorter). Every node keeps the global
parameters and the outer momentum (the same on all nodes); after the outer step the local
parameters restart from the global ones. Bytes per sync: one float32 per parameter (4 N),
every ``h`` steps. With ``h`` = 1, ``outer_lr`` = 1, ``momentum`` = 0 and an SGD inner
optimizer it is DDP with SGD (specs/gym.md G6).
"""

from __future__ import annotations

from typing import Any

import torch

from mesh.gym.strategy import Node, Shapes, Strategy


class DiLoCo(Strategy):
    name = "diloco"
    paper = "Douillard et al. 2023, DiLoCo: Distributed Low-Communication Training of Language Models"
    collective = "all-reduce"

    def __init__(self, *, h: int = 50, lr: float = 1e-3, inner: str = "adamw", weight_decay: float = 0.0,
                 outer_lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        super().__init__(lr=lr, inner=inner, weight_decay=weight_decay)
        if h < 1:
            raise ValueError(f"h must be >= 1 step, got {h}")
        self.h, self.outer_lr, self.momentum, self.nesterov = h, outer_lr, momentum, nesterov and momentum > 0

    def setup(self, node: Node) -> None:
        node.state["opt"] = self.new_optimizer(node)
        node.state["global"] = [p.detach().clone() for p in node.params]
        node.state["outer"] = torch.optim.SGD(node.state["global"], lr=self.outer_lr, momentum=self.momentum,
                                              nesterov=self.nesterov)

    def syncs(self, t: int) -> bool:
        return (t + 1) % self.h == 0

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        self.inner_step(node)
        if not self.syncs(t):
            return None
        return [g - p.detach() for g, p in zip(node.state["global"], node.params, strict=True)]

    def finish(self, node: Node, t: int, result: Any) -> None:
        for g, delta in zip(node.state["global"], result, strict=True):
            g.grad = delta
        node.state["outer"].step()
        with torch.no_grad():
            for p, g in zip(node.params, node.state["global"], strict=True):
                p.copy_(g)

    def evaluated(self, node: Node) -> list[torch.Tensor]:
        return list(node.state["global"])

    def payload_bytes(self, shapes: Shapes) -> int:
        return 4 * sum(s.numel() for s in shapes)
