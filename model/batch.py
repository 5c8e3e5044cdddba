"""A training micro-batch: clicks turned into tensors, built once, usable by any trainer
with the same structural settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from streamrecall.model.features import Featurizer, ItemFeatures, ItemLike, UserFeatures


class ClickLike(Protocol):
    """What training reads from a click (``streamrecall.events.Click`` fits)."""

    user_id: str
    item_id: str
    weight: float
    ts: int


@dataclass(frozen=True)
class TrainBatch:
    """B examples. ``item_ids`` are the clicked ids (for trending); ``known`` (B,) bool
    marks items whose content was in the catalog; ``negatives`` are extra uniformly
    sampled items (mixed negative sampling) with ``catalog_size`` they were drawn from."""

    users: UserFeatures
    items: ItemFeatures
    weights: torch.Tensor          # (B,) float32
    item_ids: tuple[str, ...]
    known: torch.Tensor            # (B,) bool
    negatives: ItemFeatures | None = None
    catalog_size: int = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def unknown_items(self) -> int:
        return int((~self.known).sum())

    @classmethod
    def build(cls, featurizer: Featurizer, clicks: Sequence[ClickLike], items: Mapping[str, ItemLike],
              histories: Sequence[Sequence[str]], negatives: Sequence[ItemLike] = ()) -> "TrainBatch":
        """From clicks, the item table, and each click's user history *before* that click.

        An item missing from ``items`` trains on its id alone and is counted in ``unknown_items``.
        """
        if len(histories) != len(clicks):
            raise ValueError(f"{len(clicks)} clicks but {len(histories)} histories")
        item_ids = tuple(c.item_id for c in clicks)
        item_feats, _ = featurizer.items(item_ids, items)
        known = torch.tensor([i in items for i in item_ids], dtype=torch.bool)
        users = featurizer.users([c.user_id for c in clicks], histories)
        weights = torch.tensor([float(c.weight) for c in clicks], dtype=torch.float32)
        neg = featurizer.encode_items(negatives) if negatives else None
        return cls(users, item_feats, weights, item_ids, known, neg, len(items) if negatives else 0)
