"""FedAvg: local training on each node, the parameters averaged every ``h`` steps.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS), algorithm 1 with every client taking part in every round. The optimizer's
state stays on its node. Bytes per sync: one float32 per parameter (4 N), every ``h`` steps.
"""

from __future__ import annotations

from typing import Any

import torch

from mesh.gym.strategy import Node, Shapes, Strategy


class FedAvg(Strategy):
    name = "fedavg"
    paper = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data"
    collective = "all-reduce"

    def __init__(self, *, h: int = 50, lr: float = 1e-3, inner: str = "adamw", weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, inner=inner, weight_decay=weight_decay)
        if h < 1:
            raise ValueError(f"h must be >= 1 step, got {h}")
        self.h = h

    def setup(self, node: Node) -> None:
        node.state["opt"] = self.new_optimizer(node)

    def syncs(self, t: int) -> bool:
        return (t + 1) % self.h == 0

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        self.inner_step(node)
        return [p.detach().clone() for p in node.params] if self.syncs(t) else None

    def finish(self, node: Node, t: int, result: Any) -> None:
        with torch.no_grad():
            for p, mean in zip(node.params, result, strict=True):
                p.copy_(mean)

    def payload_bytes(self, shapes: Shapes) -> int:
        return 4 * sum(s.numel() for s in shapes)
