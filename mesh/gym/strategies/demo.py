"""DeMo: decoupled momentum; each step only the fast components of the momentum (top-k of a
DCT per chunk) are exchanged, and the rest stays in the local momentum.

Peng, Quesnelle, Kingma 2024, "DeMo: Decoupled Momentum Optimization" (arXiv:2411.19870),
algorithm 1: m <- beta m + g; q = the top-``topk`` DCT-II coefficients of each chunk of
``chunk`` values of m; m <- m - q (decoded); the nodes' q are all-gathered and averaged, and
the parameters take a signed step, p <- p - lr sign(Q) (the reference's sign-SGD), with
decoupled weight decay. The reference splits matrices into 2-D blocks; this one flattens each
tensor into 1-D chunks (the last padded with zeros), which keeps the algorithm and its byte
count and is simpler to state. The DCT is an orthonormal matrix from ``scipy.fft.dct``.
Bytes per sync: per chunk ``topk`` float32 values and ``topk`` int32 indices, 8 topk
ceil(numel / chunk) summed over the tensors, every step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mesh.gym.strategy import Node, Shapes, Strategy


class DeMo(Strategy):
    name = "demo"
    paper = "Peng, Quesnelle, Kingma 2024, DeMo: Decoupled Momentum Optimization (arXiv:2411.19870)"
    collective = "all-gather"

    def __init__(self, *, chunk: int = 64, topk: int = 2, beta: float = 0.999, lr: float = 1e-3,
                 inner: str = "sign-sgd", weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, inner=inner, weight_decay=weight_decay)
        if chunk < 1 or not 1 <= topk <= chunk:
            raise ValueError(f"need chunk >= 1 and 1 <= topk <= chunk, got chunk {chunk}, topk {topk}")
        if inner != "sign-sgd":
            raise ValueError("DeMo's update is sign-SGD on the shared components (inner must be sign-sgd)")
        self.chunk, self.topk, self.beta = chunk, topk, beta
        from scipy.fft import dct

        self._dct = torch.from_numpy(dct(np.eye(chunk), norm="ortho", axis=0)).float()  # [chunk, chunk], orthonormal

    def setup(self, node: Node) -> None:
        node.state["momentum"] = [torch.zeros_like(p) for p in node.params]

    def _chunks(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        pad = (-flat.numel()) % self.chunk
        return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.chunk)

    def _decode(self, idx: torch.Tensor, val: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        rows = math.ceil(like.numel() / self.chunk)
        coeffs = torch.zeros(rows, self.chunk).scatter_(1, idx.long(), val)
        return (coeffs @ self._dct).reshape(-1)[: like.numel()].reshape(like.shape)  # inverse: D^T, D orthonormal

    def step(self, node: Node, t: int) -> list[torch.Tensor] | None:
        payload: list[torch.Tensor] = []
        with torch.no_grad():
            for p, m in zip(node.params, node.state["momentum"], strict=True):
                m.mul_(self.beta).add_(p.grad)
                coeffs = self._chunks(m) @ self._dct.T  # DCT-II of each chunk
                idx = coeffs.abs().topk(self.topk, dim=1).indices
                val = coeffs.gather(1, idx)
                m.sub_(self._decode(idx, val, m))  # what is shared leaves the local momentum
                payload += [idx.to(torch.int32), val]
        return payload

    def finish(self, node: Node, t: int, result: Any) -> None:
        with torch.no_grad():
            for i, p in enumerate(node.params):
                total = torch.zeros_like(p)
                for theirs in result:
                    total += self._decode(theirs[2 * i], theirs[2 * i + 1], p)
                if self.weight_decay:
                    p.mul_(1 - self.current_lr * self.weight_decay)
                p.add_(torch.sign(total / len(result)), alpha=-self.current_lr)

    def payload_bytes(self, shapes: Shapes) -> int:
        return sum(8 * self.topk * math.ceil(s.numel() / self.chunk) for s in shapes)
