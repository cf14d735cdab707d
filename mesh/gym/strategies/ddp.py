"""DDP: synchronous data parallelism, the gradients all-reduced every step.

Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"
(VLDB). Every node takes the mean of all nodes' gradients and the same optimizer step, so the
nodes stay identical. Bytes per sync: one float32 per parameter (4 N), every step.
"""

from __future__ import annotations

from typing import Any

import torch

from mesh.gym.strategy import Node, Shapes, Strategy


class DDP(Strategy):
    name = "ddp"
    paper = "Li et al. 2020, PyTorch Distributed (VLDB 2020)"
    collective = "all-reduce"

    def setup(self, node: Node) -> None:
        node.state["opt"] = self.new_optimizer(node)

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        return [p.grad.detach().clone() for p in node.params]

    def finish(self, node: Node, t: int, result: Any) -> None:
        for p, mean in zip(node.params, result, strict=True):
            p.grad.copy_(mean)
        self.inner_step(node)

    def payload_bytes(self, shapes: Shapes) -> int:
        return 4 * sum(s.numel() for s in shapes)
