"""The two towers. Each returns L2-normalised (B, dim) embeddings; nothing else lives here.

Parameters:

- ``item_id`` (id_buckets, dim): one row per hashed item id. **Zero-initialised**, so an
  id nobody has clicked contributes nothing and the item's vector is its content vector.
- ``token`` (token_buckets, dim): content tokens (categories, tags, title words, numeric
  feature names), seeded-uniform in ±1 so that even an untrained model maps items with shared
  tokens to nearby vectors.
- ``user_id`` (id_buckets, dim): one row per hashed user id, zero-initialised (cheap to
  reproduce in every replica; the user MLP's seeded hidden bias keeps it trainable).
- item MLP and user MLP: Linear(2·dim → hidden) → ReLU → Linear(hidden → dim).

The user tower pools the user's recent history (weights from ``history_pooling``: the mean, or
a recency decay) through the *item-id* table (shared
with the item tower): clicks train one representation of each item, and the user's
history lives in the same space as the items. Consequence for updates: an item-id row
that changes can change both item vectors and the vectors of users who clicked it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamrecall.model.config import ModelConfig
from streamrecall.model.features import ItemFeatures, UserFeatures
from streamrecall.model.fm import FactorizationMachine
from streamrecall.model.seeded import seeded_uniform

#: Names of the sparse tables, as they travel in checkpoints and model updates.
TABLES = ("item_id", "user_id", "token")
#: Token rows start uniform in ±1: large enough that untrained content vectors differ.
TOKEN_INIT_BOUND = 1.0
#: Biases that start seeded-uniform instead of zero (see :meth:`TwoTower.reset`).
LIVE_BIASES = ("user.mlp.0.bias",)


def _mlp(config: ModelConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * config.dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.dim))


class ItemTower(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.id_table = nn.Parameter(torch.zeros(config.id_buckets, config.dim))
        self.token_table = nn.Parameter(torch.zeros(config.token_buckets, config.dim))
        self.mlp = _mlp(config)

    def forward(self, items: ItemFeatures) -> torch.Tensor:
        """(n, dim) unit vectors of the items."""
        ids = F.embedding(items.id_rows, self.id_table, sparse=True)
        content = F.embedding_bag(items.token_rows, self.token_table, items.token_offsets, mode="sum",
                                  per_sample_weights=items.token_weights, sparse=True)
        return F.normalize(self.mlp(torch.cat([ids, content], dim=1)), dim=1)


class UserTower(nn.Module):
    def __init__(self, config: ModelConfig, item_id_table: nn.Parameter) -> None:
        super().__init__()
        self.id_table = nn.Parameter(torch.zeros(config.id_buckets, config.dim))
        self.item_id_table = item_id_table  # shared with the ItemTower (see module docstring)
        self.mlp = _mlp(config)

    def forward(self, users: UserFeatures) -> torch.Tensor:
        """(n, dim) unit vectors of the users."""
        ids = F.embedding(users.id_rows, self.id_table, sparse=True)
        history = F.embedding_bag(users.history_rows, self.item_id_table, users.history_offsets, mode="sum",
                                  per_sample_weights=users.history_weights, sparse=True)
        return F.normalize(self.mlp(torch.cat([ids, history], dim=1)), dim=1)


class TwoTower(nn.Module):
    """Both towers with the seeded initial weights of ``config`` (see :func:`reset`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.item = ItemTower(config)
        self.user = UserTower(config, self.item.id_table)
        self.reset()

    def tables(self) -> dict[str, nn.Parameter]:
        """The sparse tables by their wire name."""
        return {"item_id": self.item.id_table, "user_id": self.user.id_table, "token": self.item.token_table}

    def dense(self) -> dict[str, nn.Parameter]:
        """The dense parameters by their wire name (e.g. ``item.mlp.0.weight``)."""
        return {f"item.mlp.{k}": v for k, v in self.item.mlp.named_parameters()} | \
               {f"user.mlp.{k}": v for k, v in self.user.mlp.named_parameters()}

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial weights: a pure function of the config (seed included)."""
        for name, table in self.tables().items():
            table.copy_(self.initial_rows(name))
        self.reset_dense()

    def initial_rows(self, table: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The initial values of sparse ``table`` (the id tables zero, the token table seeded),
        all of it or only ``rows``."""
        t = self.tables()[table]
        if table != "token":
            return torch.zeros((t.shape[0] if rows is None else len(rows), t.shape[1]))
        return seeded_uniform(tuple(t.shape), TOKEN_INIT_BOUND, self.config.seed, "token",
                              rows=None if rows is None else rows.numpy())

    @torch.no_grad()
    def reset_dense(self) -> None:
        """The dense layers back to their initial weights."""
        seed = self.config.seed
        for name, p in self.dense().items():
            if name in LIVE_BIASES:
                # The user tower's inputs are all zero at init (zero id rows, and a history pooled
                # from zero item-id rows): with zero biases its output is exactly 0, F.normalize(0)
                # sends a huge gradient into the last bias only (ReLU'(0) = 0 blocks the rest, the
                # user-id rows included) and Adam's second moment then freezes that bias. A seeded
                # hidden bias (torch's default Linear range) gives every user a unit vector and a
                # gradient path to its id row and the whole MLP from the first step.
                p.copy_(seeded_uniform(tuple(p.shape), 1.0 / math.sqrt(2 * self.config.dim), seed, name))
            elif p.dim() == 1:
                p.zero_()  # zero biases: the output reflects the inputs from the first step
            else:
                p.copy_(seeded_uniform(tuple(p.shape), 1.0 / math.sqrt(p.shape[1]), seed, name))


def build_model(config: ModelConfig) -> "TwoTower | FactorizationMachine":
    """The recall model ``config.tower`` names, with its seeded initial weights."""
    return FactorizationMachine(config) if config.tower == "fm" else TwoTower(config)
