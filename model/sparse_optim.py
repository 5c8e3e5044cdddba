"""The optimiser of the sparse tables: touches only the rows of the batch.

``rowwise_adagrad`` (as in FBGEMM/DLRM): one accumulator per *row* (the mean squared
gradient of the row), so a head item seen 30 times in a batch takes a damped step and a
rare item a large one, for 4 bytes of state per row instead of 4·dim. Plain ``sgd``
(lr × batch size, i.e. a per-example rate) is there for comparison; on this stream it
blows up head-item rows unless the rate is small enough to starve the tail.
"""

from __future__ import annotations

from typing import Literal

import torch


class SparseRowOptimizer:
    def __init__(self, tables: dict[str, torch.nn.Parameter], *, lr: float,
                 kind: Literal["sgd", "rowwise_adagrad"] = "rowwise_adagrad", eps: float = 1e-8) -> None:
        self.tables = tables
        self.lr = lr
        self.kind = kind
        self.eps = eps
        self.accumulators = {name: torch.zeros(t.shape[0], dtype=torch.float32) for name, t in tables.items()}

    def zero_grad(self) -> None:
        for t in self.tables.values():
            t.grad = None

    @torch.no_grad()
    def step(self, batch_size: int) -> None:
        for name, table in self.tables.items():
            if table.grad is None:
                continue
            grad = table.grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            if self.kind == "sgd":
                table.index_add_(0, rows, values, alpha=-self.lr * batch_size)
                continue
            acc = self.accumulators[name]
            acc.index_add_(0, rows, values.pow(2).mean(dim=1))
            scale = -self.lr / (acc[rows].sqrt() + self.eps)
            table.index_add_(0, rows, values * scale.unsqueeze(1))

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.accumulators)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, acc in self.accumulators.items():
            saved = state[name]
            if saved.shape != acc.shape or saved.dtype != acc.dtype:
                raise ValueError(f"sparse optimiser state {name!r} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(acc.shape)}")
            acc.copy_(saved)
