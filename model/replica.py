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

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import ModelUpdateError, ModelUpdateRefused
from streamrecall.model.features import Featurizer, ItemLike, bag_index
from streamrecall.model.towers import build_model
from streamrecall.model.update import ChangedRows, ModelUpdate


@dataclass(frozen=True)
class Applied:
    """What :meth:`TowerReplica.apply` did. ``reencode_all``: every vector is stale (the dense
    layers moved); otherwise ``changed`` holds the sparse rows whose values moved and how far —
    for a delta its rows, for a full update the rows that differ from what the replica held (a
    full update on a replica that followed the deltas before it moves only the last step's rows)."""

    status: Literal["applied", "duplicate", "gap"]
    version: int
    kind: Literal["full", "delta"]
    reencode_all: bool
    changed: ChangedRows | None = None


@dataclass(frozen=True)
class _Staged:
    """A full update read against the replica at ``generation`` (:meth:`TowerReplica.prepare`):
    per table the rows that move, their new values and how far they move; which rows are written
    afterwards."""

    update: ModelUpdate
    generation: int
    dense_moved: bool
    moves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    written: dict[str, torch.Tensor]


#: Rows compared per step when a full update is diffed against the replica (bounds the temporary copy).
DIFF_CHUNK = 65_536


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
        self._generation = 0  # counts applied updates: a staged full update is only good for the one it was read at
        self._staged: _Staged | None = None  # prepare()'s result, waiting for apply()

    def prepare(self, update: ModelUpdate) -> None:
        """Do the costly part of applying a full ``update`` now, without changing what this replica
        serves: the next :meth:`apply` of the same update only writes the rows that move.

        For a reader thread other than the one that applies (the model-update stream stages a big
        full update off the role's loop): it only reads the tables, so it may run while the loop
        encodes with them, but no other update may be applied meanwhile (the stream holds the
        records behind it). If one is, :meth:`apply` notices and stages again. A refused, duplicate
        or gapped update, and a delta, are left to :meth:`apply`."""
        if update.kind != "full":
            return
        try:
            if self._verdict(update) is not None:
                return
        except (ModelUpdateError, ModelUpdateRefused):
            return  # apply() raises it
        with torch.no_grad():
            self._staged = self._stage_full(update)

    def apply(self, update: ModelUpdate) -> Applied:
        """Apply one decoded update (see the module docstring for the rules)."""
        verdict = self._verdict(update)
        if verdict is not None:
            return verdict
        with torch.no_grad():
            if update.kind == "full":
                staged, self._staged = self._staged, None
                if staged is None or staged.update is not update or staged.generation != self._generation:
                    staged = self._stage_full(update)
                changed, dense_moved = self._commit_full(staged)
            else:
                changed, dense_moved = self._apply_delta(update), update.dense_changed
                if dense_moved:
                    for name, p in self.model.dense().items():
                        p.copy_(update.dense[name])
        self._generation += 1
        self.version = update.version
        self.trainer_epoch = update.trainer_epoch
        self.trained_through_ms = max(self.trained_through_ms, update.trained_through_ms)
        self.trending = list(update.trending)
        return Applied("applied", self.version, update.kind, dense_moved, None if dense_moved else changed)

    def _verdict(self, update: ModelUpdate) -> Applied | None:
        """Why ``update`` is not applied (raised, or a duplicate or gap), or None: apply it."""
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
        return None

    def _apply_delta(self, update: ModelUpdate) -> ChangedRows:
        tables = self.model.tables()
        rows, shift = {}, {}
        for name, part in update.sparse.items():
            table = tables[name]
            shift[name] = (part.values - table[part.rows]).norm(dim=1)
            rows[name] = part.rows
            table[part.rows] = part.values
            self._written[name][part.rows] = True
        return ChangedRows(rows, shift)

    def _stage_full(self, update: ModelUpdate) -> "_Staged":
        """What applying full ``update`` changes, read without writing: reset to the initial weights
        and apply ``update`` (only the rows written since the last full update are restored: the
        others still hold their initial values, and regenerating every seeded token row took ~1 s
        on one core). Only rows whose values differ from the replica's are kept: a replica that
        followed the deltas before the update moves only the last step's rows."""
        dense_moved = any(not torch.equal(p, update.dense[name]) for name, p in self.model.dense().items())
        tables = self.model.tables()
        moves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        written_after: dict[str, torch.Tensor] = {}
        for name, written in self._written.items():
            part = update.sparse.get(name)
            revert = written.clone()
            if part is not None:
                revert[part.rows] = False  # overwritten by the update anyway
            targets = [(r, None) for r in revert.nonzero().flatten().split(DIFF_CHUNK)]
            if part is not None:
                targets += list(zip(part.rows.split(DIFF_CHUNK), part.values.split(DIFF_CHUNK)))
            moved_rows, moved_values, moved_shift = [], [], []
            for rows, values in targets:
                if values is None:
                    values = self.model.initial_rows(name, rows)
                shift = (values - tables[name][rows]).norm(dim=1)
                moved = shift > 0
                moved_rows.append(rows[moved])
                moved_values.append(values[moved])
                moved_shift.append(shift[moved])
            after = torch.zeros_like(written)
            if part is not None:
                after[part.rows] = True
            written_after[name] = after
            if moved_rows:
                moves[name] = (torch.cat(moved_rows), torch.cat(moved_values), torch.cat(moved_shift))
        return _Staged(update, self._generation, dense_moved, moves, written_after)

    def _commit_full(self, staged: "_Staged") -> tuple[ChangedRows, bool]:
        """Write what :meth:`_stage_full` found (the moved rows and the dense layers): the only part
        of a full update that changes what the replica serves."""
        for name, p in self.model.dense().items():
            p.copy_(staged.update.dense[name])
        tables = self.model.tables()
        for name, (rows, values, _) in staged.moves.items():
            tables[name][rows] = values
        self._written.update(staged.written)
        return (ChangedRows({name: m[0] for name, m in staged.moves.items()},
                            {name: m[2] for name, m in staged.moves.items()}), staged.dense_moved)

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

    def items_touched(self, update: ModelUpdate | ChangedRows, items: Sequence[ItemLike]) -> list[str]:
        """Ids of ``items`` whose vectors ``update`` changes: all of them after a full update
        or a dense change, else those whose id row or any content-token row changed."""
        if update.kind == "full" or update.dense_changed:
            return [i.item_id for i in items]
        id_mask = _mask(update.changed_rows("item_id"), self.config.id_buckets)
        tok_mask = _mask(update.changed_rows("token"), self.config.token_buckets)
        if not items or not (id_mask.any() or tok_mask.any()):
            return []
        feats = self.featurizer.encode_items(items)
        hit = id_mask[feats.id_rows]
        if feats.token_rows.numel():
            bag = bag_index(feats.token_offsets, feats.token_rows.numel())
            hit |= torch.zeros(len(items), dtype=torch.bool).index_put_((bag,), tok_mask[feats.token_rows],
                                                                        accumulate=True)
        return [items[i].item_id for i in hit.nonzero().flatten().tolist()]

    def items_drift(self, changed: ChangedRows, items: Sequence[ItemLike]) -> np.ndarray:
        """(len(items),) float32: how far ``changed`` may have moved each item's tower input — its id
        row's shift plus its token rows' shifts weighted as the tower pools them. For the FM that
        bounds the move of the factor part of the item vector (triangle inequality); for the two
        towers it is the move of the input to the item MLP. 0: the item is not touched."""
        if not items:
            return np.zeros(0, dtype=np.float32)
        id_shift = changed.row_shift("item_id", self.config.id_buckets)
        tok_shift = changed.row_shift("token", self.config.token_buckets)
        feats = self.featurizer.encode_items(items)
        drift = id_shift[feats.id_rows]
        if feats.token_rows.numel():
            bag = bag_index(feats.token_offsets, feats.token_rows.numel())
            drift = drift.index_add(0, bag, tok_shift[feats.token_rows] * feats.token_weights)
        return drift.numpy()

    def users_touched(self, update: ModelUpdate | ChangedRows, user_ids: Sequence[str],
                      histories: Sequence[Sequence[str]]) -> list[str]:
        """Ids of users whose vectors ``update`` changes: all after a full update or a dense
        change, else those whose id row or any history item's id row changed."""
        if update.kind == "full" or update.dense_changed:
            return list(user_ids)
        user_mask = _mask(update.changed_rows("user_id"), self.config.id_buckets)
        item_mask = _mask(update.changed_rows("item_id"), self.config.id_buckets)
        out = []
        for user_id, history in zip(user_ids, histories):
            recent = history[-self.config.history_len:]
            if user_mask[self.featurizer.user_row(user_id)] or any(
                    item_mask[r] for r in self.featurizer.item_rows(recent)):
                out.append(user_id)
        return out


def _mask(rows: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows] = True
    return mask

