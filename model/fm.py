"""FM recall: a factorization machine whose score is one inner product (docs/model.md, "FM recall").

Every feature field has one embedding row of ``dim`` columns: the first ``dim − 1`` are its
factor vector v, the last its first-order weight w. Fields, with their values x:

- user side: the user id (x = 1) and each history item id (x = its pooling weight, summing to 1);
- item side: the item id (x = 1) and each content token (x = 1/n over the item's n tokens).

The FM score over all fields is ŷ = w₀ + Σ wᵢxᵢ + Σ_{i<j} ⟨vᵢ, vⱼ⟩xᵢxⱼ. Split by side, with
U = Σ_user xᵢvᵢ and V = Σ_item xⱼvⱼ:

    ŷ = ⟨U, V⟩ + [Σ_item wⱼxⱼ + Σ_{i<j ∈ item} ⟨vᵢ, vⱼ⟩xᵢxⱼ] + c(user)

where c(user) (w₀, the user fields' first-order terms and their pairs) is the same for every item
of one user, so it changes neither a ranking nor a softmax over items. Folding the bracket in
as one extra column gives the two vectors this module returns:

    user = [U ; 1]        item = [V ; Σ_item wⱼxⱼ + ½(‖V‖² − Σ_item xⱼ²‖vⱼ‖²)]

and ⟨user, item⟩ = ŷ − c(user) exactly. The vectors are *not* normalised (a norm is part of the
score): the index must use the inner-product space, which the indexer does ('ip'); cosine
would drop both the norms and the first-order column's meaning.

The tables are the two towers' (``item_id``, ``user_id``, ``token``, same shapes), so model
updates, checkpoints and replicas carry the FM unchanged; there are no dense layers. History
items are read through the item-id table, as in the two towers (one row per item, so a
history item and a candidate item share their factor: the FM's "history item X" and "item X"
fields are tied). The user-id rows' last column is never read (a user's first-order term is
part of c(user)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamrecall.model.config import ModelConfig
from streamrecall.model.features import ItemFeatures, UserFeatures, bag_index
from streamrecall.model.seeded import seeded_uniform

#: Token rows start uniform in ±this: content-aware at init, but small next to a ±1 that would
#: put untrained inner products far outside the softmax's useful range.
FM_TOKEN_INIT_BOUND = 0.1


class FMItemSide(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.id_table = nn.Parameter(torch.zeros(config.id_buckets, config.dim))
        self.token_table = nn.Parameter(torch.zeros(config.token_buckets, config.dim))

    def forward(self, items: ItemFeatures) -> torch.Tensor:
        """(n, dim): [V ; item-side first-order + item-side pairs] (module docstring)."""
        f = self.id_table.shape[1] - 1
        ids = F.embedding(items.id_rows, self.id_table, sparse=True)          # (n, d), x = 1
        tok = F.embedding(items.token_rows, self.token_table, sparse=True)    # (T, d)
        x = items.token_weights                                               # (T,)
        bag = bag_index(items.token_offsets, int(items.token_rows.shape[0]))
        total = torch.index_add(ids, 0, bag, tok * x.unsqueeze(1))           # Σ x·[v ; w] per item
        squares = (ids[:, :f] ** 2).sum(1).index_add(0, bag, x ** 2 * (tok[:, :f] ** 2).sum(1))
        pairs = 0.5 * ((total[:, :f] ** 2).sum(1) - squares)                  # Σ_{i<j} ⟨vᵢ,vⱼ⟩xᵢxⱼ
        return torch.cat([total[:, :f], (total[:, f] + pairs).unsqueeze(1)], dim=1)


class FMUserSide(nn.Module):
    def __init__(self, config: ModelConfig, item_id_table: nn.Parameter) -> None:
        super().__init__()
        self.id_table = nn.Parameter(torch.zeros(config.id_buckets, config.dim))
        self.item_id_table = item_id_table  # history items share the item side's id rows

    def forward(self, users: UserFeatures) -> torch.Tensor:
        """(n, dim): [U ; 1] (module docstring)."""
        f = self.id_table.shape[1] - 1
        ids = F.embedding(users.id_rows, self.id_table, sparse=True)
        history = F.embedding_bag(users.history_rows, self.item_id_table, users.history_offsets, mode="sum",
                                  per_sample_weights=users.history_weights, sparse=True)
        factors = (ids + history)[:, :f]
        return torch.cat([factors, torch.ones(factors.shape[0], 1)], dim=1)


class FactorizationMachine(nn.Module):
    """The FM with the seeded initial weights of ``config``; the same interface as TwoTower."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.item = FMItemSide(config)
        self.user = FMUserSide(config, self.item.id_table)
        self.reset()

    def tables(self) -> dict[str, nn.Parameter]:
        return {"item_id": self.item.id_table, "user_id": self.user.id_table, "token": self.item.token_table}

    def dense(self) -> dict[str, nn.Parameter]:
        return {}

    @torch.no_grad()
    def reset(self) -> None:
        """Id rows zero (an update carries only trained rows), token rows seeded-uniform."""
        for name, table in self.tables().items():
            table.copy_(self.initial_rows(name))

    def initial_rows(self, table: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The initial values of sparse ``table``, all of it or only ``rows`` (as TwoTower's)."""
        t = self.tables()[table]
        if table != "token":
            return torch.zeros((t.shape[0] if rows is None else len(rows), t.shape[1]))
        return seeded_uniform(tuple(t.shape), FM_TOKEN_INIT_BOUND, self.config.seed, "fm.token",
                              rows=None if rows is None else rows.numpy())

    def reset_dense(self) -> None:
        """The FM has no dense layers (the interface replicas use)."""
