"""A read-only copy of the towers, kept current by applying model updates in order.

Used by the indexer (item vectors) and the publisher (user vectors). A fresh replica is
at version 0: the seeded initial weights, identical to a new trainer's with the same
config. At version 0 item vectors are already deterministic and content-aware (items
sharing categories, tags or title words share seeded token rows, so they land close
together), but they are not trained; every user maps to the same vector.

Apply rules:

- full update with version > current: reset to the initial weights, apply, done (only the rows
  written since the last full update are restored: the others still hold their initial values).
- delta with version ≤ current, or full with version ≤ current: ``duplicate`` (skipped).
- delta whose base_version ≠ current version: ``gap`` (nothing applied); the caller keeps
  its vectors and waits for the next full update.

Fencing (docs/security.md), checked before the rules above, raise :class:`ModelUpdateRefused`:

- an update whose ``trainer_epoch`` is below the highest epoch applied: ``stale-epoch`` (a trainer
  process that a newer one replaced, still publishing);
- an update more than ``max_version_jump`` versions above the current one, once a version is
  applied: ``version-jump`` (a forged version 10^18 would otherwise make every genuine update
  a duplicate and freeze the replica). A fresh replica takes its first update at any version:
  it is the last full update on the topic, wherever the version chain stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import ModelUpdateError, ModelUpdateRefused
from streamrecall.model.features import Featurizer, ItemLike, bag_index
from streamrecall.model.towers import build_model
from streamrecall.model.update import ModelUpdate


@dataclass(frozen=True)
class Applied:
    """What :meth:`TowerReplica.apply` did, measured on the replica's own weights.

    ``reencode_all``: the dense layers changed value, so every vector is stale. Otherwise only
    the sparse rows in ``moved`` (by table) changed value: rows an update carries with the value
    the replica already holds move nothing. So a full update of an unchanged model (the trainer
    sends one every ``full_every_s`` whatever happened) moves nothing, and one after a few new
    clicks moves only their rows; a full update is not a new epoch unless its dense layers
    differ (the FM has none)."""

    status: Literal["applied", "duplicate", "gap"]
    version: int
    kind: Literal["full", "delta"]
    reencode_all: bool
    moved: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def moved_anything(self) -> bool:
        return self.reencode_all or any(rows.numel() for rows in self.moved.values())


#: Default bound on how far above the current version an update may be (see the module docstring):
#: versions count updates, about 5 a second at the trainer's default flush, so this is weeks of them.
DEFAULT_MAX_VERSION_JUMP = 10_000_000


class TowerReplica:
    def __init__(self, config: ModelConfig | None = None, max_version_jump: int = DEFAULT_MAX_VERSION_JUMP) -> None:
        if max_version_jump < 1:
            raise ValueError(f"max_version_jump must be >= 1, got {max_version_jump}")
        self.config = config or ModelConfig()
        self.max_version_jump = max_version_jump
        self.model = build_model(self.config).eval()
        self.featurizer = Featurizer(self.config)
        self.version = 0
        self.trainer_epoch = 0  # the highest fencing epoch applied (docs/security.md)
        self.trained_through_ms = 0  # newest click event time the applied model trained on
        self.trending: list[tuple[str, float]] = []
        # Rows of each sparse table written since the last full update. Only these differ from
        # their initial values, so a full update restores only them: regenerating every seeded
        # token row took ~1 s on one core (2^18 x 64 values), with the towers held for writing.
        self._written = {name: torch.zeros(t.shape[0], dtype=torch.bool) for name, t in self.model.tables().items()}

    def apply(self, update: ModelUpdate) -> Applied:
        """Apply one decoded update (see the module docstring for the rules)."""
        if update.model != self.config.structural():
            raise ModelUpdateError(f"update was made for model {update.model}, this replica is "
                                   f"{self.config.structural()}")
        if update.trainer_epoch < self.trainer_epoch:
            raise ModelUpdateRefused("stale-epoch", f"update v{update.version} is from trainer epoch {update.trainer_epoch}; "
                                     f"this replica applied epoch {self.trainer_epoch} (a replaced trainer still publishing?)")
        if self.version and update.version > self.version + self.max_version_jump:
            raise ModelUpdateRefused("version-jump", f"update v{update.version} is more than {self.max_version_jump} "
                                     f"versions above v{self.version} (model_max_version_jump)")
        if update.version <= self.version:
            return Applied("duplicate", self.version, update.kind, False)
        if update.kind == "delta" and update.base_version != self.version:
            return Applied("gap", self.version, update.kind, False)
        with torch.no_grad():
            tables = self.model.tables()
            dense = self.model.dense()
            dense_moved = update.dense_changed and any(not torch.equal(p, update.dense[name])
                                                       for name, p in dense.items())
            moved = self._restore_initial(update) if update.kind == "full" else {}
            for name, part in update.sparse.items():
                differs = (tables[name][part.rows] != part.values).any(1)
                tables[name][part.rows] = part.values
                self._written[name][part.rows] = True
                moved[name] = _union(moved.get(name), part.rows[differs])
            if update.dense_changed:
                for name, p in dense.items():
                    p.copy_(update.dense[name])
        self.version = update.version
        self.trainer_epoch = update.trainer_epoch
        self.trained_through_ms = max(self.trained_through_ms, update.trained_through_ms)
        self.trending = list(update.trending)
        return Applied("applied", self.version, update.kind, dense_moved,
                       {name: rows for name, rows in moved.items() if rows.numel()})

    def _restore_initial(self, update: ModelUpdate) -> dict[str, torch.Tensor]:
        """What ``model.reset()`` would do to the sparse tables before applying ``update``, at the
        cost of the rows written since the last full update that ``update`` does not overwrite;
        returns those of them whose value changed. (The dense layers are all in ``update``.)"""
        tables = self.model.tables()
        moved: dict[str, torch.Tensor] = {}
        for name, written in self._written.items():
            part = update.sparse.get(name)
            if part is not None:
                written[part.rows] = False  # overwritten by the update anyway
            rows = written.nonzero().flatten()
            if rows.numel():
                initial = self.model.initial_rows(name, rows)
                moved[name] = rows[(tables[name][rows] != initial).any(1)]
                tables[name][rows] = initial
            written.zero_()
        return moved

    @torch.no_grad()
    def encode_items(self, items: Sequence[ItemLike]) -> np.ndarray:
        """(n, dim) float32 vectors of the items at the current version (unit length for the two
        towers; the FM's are not normalised, see docs/model.md)."""
        if not items:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return self.model.item(self.featurizer.encode_items(items)).numpy()

    @torch.no_grad()
    def encode_users(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(n, dim) float32 vectors of users from their ids and recent clicked item ids."""
        if len(user_ids) != len(histories):
            raise ValueError(f"{len(user_ids)} users but {len(histories)} histories")
        if not user_ids:
            return np.zeros((0, self.config.dim), dtype=np.float32)
        return self.model.user(self.featurizer.users(user_ids, histories)).numpy()

    def items_touched(self, applied: Applied, items: Sequence[ItemLike]) -> list[str]:
        """Ids of ``items`` whose vectors the update ``applied`` changed: all of them after a dense
        change, else those whose id row or any content-token row moved."""
        if applied.reencode_all:
            return [i.item_id for i in items]
        id_mask = _mask(applied.moved.get("item_id", _NO_ROWS), self.config.id_buckets)
        tok_mask = _mask(applied.moved.get("token", _NO_ROWS), self.config.token_buckets)
        if not items or not (id_mask.any() or tok_mask.any()):
            return []
        feats = self.featurizer.encode_items(items)
        hit = id_mask[feats.id_rows]
        if feats.token_rows.numel():
            bag = bag_index(feats.token_offsets, feats.token_rows.numel())
            hit |= torch.zeros(len(items), dtype=torch.bool).index_put_((bag,), tok_mask[feats.token_rows],
                                                                        accumulate=True)
        return [items[i].item_id for i in hit.nonzero().flatten().tolist()]

    def users_touched(self, applied: Applied, user_ids: Sequence[str],
                      histories: Sequence[Sequence[str]]) -> list[str]:
        """Ids of users whose vectors the update ``applied`` changed: all after a dense change, else
        those whose id row or any history item's id row moved."""
        if applied.reencode_all:
            return list(user_ids)
        user_mask = _mask(applied.moved.get("user_id", _NO_ROWS), self.config.id_buckets)
        item_mask = _mask(applied.moved.get("item_id", _NO_ROWS), self.config.id_buckets)
        out = []
        for user_id, history in zip(user_ids, histories):
            recent = history[-self.config.history_len:]
            if user_mask[self.featurizer.user_row(user_id)] or any(
                    item_mask[r] for r in self.featurizer.item_rows(recent)):
                out.append(user_id)
        return out


_NO_ROWS = torch.zeros(0, dtype=torch.int64)


def _union(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None or not a.numel() else torch.unique(torch.cat([a, b]))


def merge_moved(*moved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows moved by several updates together, by table (to re-encode once for all of them)."""
    out: dict[str, torch.Tensor] = {}
    for m in moved:
        for name, rows in m.items():
            out[name] = _union(out.get(name), rows)
    return out


def _mask(rows: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows] = True
    return mask

