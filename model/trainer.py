"""The online trainer: one optimisation step per micro-batch, checkpoints, model updates.

Optimisers (measured on 2 cores, see docs/model.md): row-wise Adagrad on the sparse
tables (``sparse=True`` gradients touch only the rows of the batch, and the state is one
float per row; torch's element-wise Adagrad or SparseAdam on 1M-row tables cost 2–20×
more per step) and Adam/Adagrad on the small dense layers.

Versions. ``version`` is the version of the last exported model update (0: the seeded
initial weights nobody needs to be sent). It only grows. The first export after
construction or :meth:`restore` is always a full update, because consumers may hold
deltas this process never saw (exported after the checkpoint it restored). A trainer
role that restarts should read the last version on the model-updates topic and call
:meth:`advance_version` with it, so the new full update supersedes everything published.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from streamrecall.model.batch import ClickLike, TrainBatch
from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import CheckpointError
from streamrecall.model.features import Featurizer, ItemFeatures, ItemLike, UserFeatures
from streamrecall.model.frequency import FrequencyEstimator
from streamrecall.model.loss import sampled_softmax_loss
from streamrecall.model.replay import ReplayBuffer
from streamrecall.model.sparse_optim import SparseRowOptimizer
from streamrecall.atomicfile import atomic_write
from streamrecall.model.safeio import SafeIOError, dumps, loads, read_layout
from streamrecall.model.towers import build_model
from streamrecall.model.trending import TrendingCounter
from streamrecall.model.update import ModelUpdate, SparseRows, encode_update

CHECKPOINT_FORMAT = "streamrecall.checkpoint"
CHECKPOINT_VERSION = 1


class OnlineTrainer:
    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config = config or ModelConfig()
        self.model = build_model(config)
        self.featurizer = Featurizer(config)
        self.estimator = FrequencyEstimator(config.estimator_buckets, hashes=config.estimator_hashes,
                                            alpha=config.estimator_alpha, p_min=config.p_min,
                                            prior_gaps=config.estimator_prior_gaps)
        self.trending = TrendingCounter(config.trending_size, config.trending_half_life)
        self._sparse_opt = SparseRowOptimizer(self.model.tables(), lr=config.lr_sparse, kind=config.sparse_optimizer)
        dense = list(self.model.dense().values())
        # None for the FM, which has no dense layers (torch refuses an optimiser of nothing).
        self._dense_opt: torch.optim.Optimizer | None = None if not dense else (
            torch.optim.Adam(dense, lr=config.lr_dense) if config.dense_optimizer == "adam"
            else torch.optim.Adagrad(dense, lr=config.lr_dense))
        self._touched = {k: torch.zeros(t.shape[0], dtype=torch.bool) for k, t in self.model.tables().items()}
        self._ever = {k: torch.zeros(t.shape[0], dtype=torch.bool) for k, t in self.model.tables().items()}
        self._rng = random.Random(config.seed)                  # negatives
        self._gen = torch.Generator().manual_seed(config.seed)  # down-sampling
        self.version = 0
        self.steps = 0
        self._needs_full = True

    # ---- training ----------------------------------------------------------------------
    def make_batch(self, clicks: Sequence[ClickLike], items: Mapping[str, ItemLike],
                   histories: Sequence[Sequence[str]]) -> TrainBatch:
        """A batch from clicks, the item table, and each click's history before it.

        With ``mixed_negatives`` > 0, that many items are drawn uniformly from ``items``
        (O(1) each when it is an :class:`~streamrecall.model.catalog.ItemCatalog`).
        """
        negatives: list[ItemLike] = []
        m = self.config.mixed_negatives
        if m and len(items):
            sample = getattr(items, "sample", None)
            if sample is not None:
                negatives = sample(m, self._rng)
            else:
                pool = list(items.values())
                negatives = [pool[self._rng.randrange(len(pool))] for _ in range(m)]
        return TrainBatch.build(self.featurizer, clicks, items, histories, negatives)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimisation step on ``batch``. Returns loss, examples (trained), skipped (weight 0 or
        down-sampled), downsampled, unknown_items, steps and version."""
        n = len(batch)
        keys = batch.items.keys
        # The estimator counts every click (p̂ is the click probability, which trending and
        # down-sampling read); what the loss needs is the probability that an item occupies a
        # column of the *trained* batch, p̂ × keep probability, computed below.
        self.estimator.update(keys)
        p = self.estimator.probability(keys)
        self.trending.add(i for i, k in zip(batch.item_ids, batch.known.tolist()) if k)
        keep, keep_p, downsampled = self._keep(batch.weights, p)
        idx = keep.nonzero().flatten()
        metrics = {"examples": float(idx.numel()), "skipped": float(n - idx.numel()),
                   "downsampled": float(downsampled), "unknown_items": float(batch.unknown_items)}
        if idx.numel() == 0:
            return metrics | {"loss": 0.0, "steps": float(self.steps), "version": float(self.version)}
        # Expected occurrences of each column's item among the trained batch's columns: the n
        # clicks drawn, each of this item with probability p̂ and kept with keep_p.
        expected = n * p * keep_p
        if idx.numel() == n:
            users, items, weights, expected_kept = batch.users, batch.items, batch.weights, expected
        else:
            users, items, weights, expected_kept = (batch.users.select(idx), batch.items.select(idx),
                                                    batch.weights[idx], expected[idx])
        loss = self._optimise(users, items, weights, expected_kept, batch)
        self.steps += 1
        return metrics | {"loss": loss, "steps": float(self.steps), "version": float(self.version)}

    def replay_step(self, buffer: ReplayBuffer, items: Mapping[str, ItemLike], size: int) -> dict[str, float]:
        """One step on ``size`` clicks drawn from ``buffer`` (see :mod:`streamrecall.model.replay`).

        Replayed clicks are not new occurrences: the estimator, trending and down-sampling do not
        see them, and the logQ correction uses the buffer's own proposal (the probability that a
        draw yields each column's item), not p̂. No sampled negatives. Returns loss, examples, steps.
        """
        sample = buffer.sample(size)
        if not sample.clicks:
            return {"loss": 0.0, "examples": 0.0, "steps": float(self.steps)}
        batch = TrainBatch.build(self.featurizer, sample.clicks, items, sample.histories)
        expected = len(batch) * torch.from_numpy(sample.proposal).float()
        idx = (batch.weights > 0).nonzero().flatten()
        if idx.numel() == 0:
            return {"loss": 0.0, "examples": 0.0, "steps": float(self.steps)}
        loss = self._optimise(batch.users.select(idx), batch.items.select(idx), batch.weights[idx], expected[idx], batch)
        self.steps += 1
        return {"loss": loss, "examples": float(idx.numel()), "steps": float(self.steps)}

    def _keep(self, weights: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(n,) bool: the clicks trained on (weight > 0, and kept by down-sampling, which draws from
        the trainer's generator); (n,) their keep probability; how many down-sampling dropped."""
        keep = weights > 0
        keep_p = self._keep_probability(p)
        downsampled = 0
        if self.config.downsample_top is not None:
            drop = torch.rand(int(weights.shape[0]), generator=self._gen) >= keep_p
            downsampled = int((drop & keep).sum())
            keep &= ~drop
        return keep, keep_p, downsampled

    def _keep_probability(self, p: torch.Tensor) -> torch.Tensor:
        """(n,) probability that a click on an item of click probability ``p`` is trained on:
        √(t/p̂) capped at 1 with ``downsample_top=t`` (word2vec-style), else 1."""
        t = self.config.downsample_top
        return torch.ones_like(p) if t is None else torch.sqrt(t / p).clamp(max=1.0)

    def _optimise(self, users: UserFeatures, items: ItemFeatures, weights: torch.Tensor, expected: torch.Tensor,
                  batch: TrainBatch) -> float:
        """``expected`` (B,): expected occurrences of each trained column's item among the batch columns."""
        cfg = self.config
        u = self.model.user(users)
        v = self.model.item(items)
        neg = batch.negatives
        neg_v = self.model.item(neg) if neg is not None else None
        log_q = neg_log_q = None
        if cfg.logq and cfg.logq_alpha > 0:
            # The candidates are one pool: the batch columns and M uniform draws from N items. An
            # item's proposal is its expected count in that pool, B·p̂·keep + M/N, whichever
            # source a column came from (one term per source would under-state the proposal of
            # an item that both sources can draw). See loss.py for the units.
            uniform = len(neg) / max(batch.catalog_size, 1) if neg is not None else 0.0
            log_q = cfg.logq_alpha * torch.log(expected + uniform)
            if neg is not None:
                neg_p = self.estimator.probability(neg.keys)  # the clicks' estimate; negatives are not counted
                neg_log_q = cfg.logq_alpha * torch.log(len(batch) * neg_p * self._keep_probability(neg_p) + uniform)
        loss = sampled_softmax_loss(u, v, temperature=cfg.softmax_temperature, item_keys=items.keys, log_q=log_q,
                                    weights=weights, neg_item=neg_v,
                                    neg_keys=neg.keys if neg is not None else None, neg_log_q=neg_log_q)
        self._sparse_opt.zero_grad()
        if self._dense_opt is not None:
            self._dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sparse_opt.step(len(items))
        if self._dense_opt is not None:
            self._dense_opt.step()
        self._mark("item_id", items.id_rows, users.history_rows, *( [neg.id_rows] if neg is not None else []))
        self._mark("user_id", users.id_rows)
        self._mark("token", items.token_rows, *([neg.token_rows] if neg is not None else []))
        return float(loss.detach())

    def _mark(self, table: str, *rows: torch.Tensor) -> None:
        for r in rows:
            self._touched[table][r] = True
            self._ever[table][r] = True

    # ---- model updates -----------------------------------------------------------------
    def advance_version(self, at_least: int) -> None:
        """Make the next export's version exceed ``at_least`` (e.g. the last version found on
        the topic after a restart); the next export is then a full update."""
        if at_least > self.version:
            self.version = at_least
            self._needs_full = True

    def export_update(self, full: bool = False, *, dense: bool = False, now_ms: int | None = None,
                      trained_through_ms: int = 0, trainer_epoch: int = 0) -> bytes:
        """The next model update as bytes (see :mod:`streamrecall.model.update`).

        A delta carries the sparse rows touched since the previous export, and the dense
        layers only when ``dense`` is true (a dense change makes consumers re-encode
        everything). The first export after construction or restore is full whatever
        ``full`` says. ``trained_through_ms`` (the newest click event time trained on) travels
        in the header, so consumers can tell how fresh the model they serve is; ``trainer_epoch`` is the
        writing process's fencing epoch (replicas refuse updates from an older one).
        """
        full = full or self._needs_full
        masks = self._ever if full else self._touched
        sparse = {}
        with torch.no_grad():
            for name, table in self.model.tables().items():
                rows = masks[name].nonzero().flatten()
                if rows.numel():
                    sparse[name] = SparseRows(rows, table[rows].clone())
            dense_t = {k: v.detach().clone() for k, v in self.model.dense().items()} if (full or dense) else {}
        # A full update always says dense_changed (consumers re-encode everything); a model without
        # dense layers (the FM) never changes them in a delta.
        update = ModelUpdate(version=self.version + 1, base_version=self.version,
                             kind="full" if full else "delta", dense_changed=full or bool(dense_t),
                             model=self.config.structural(), dense=dense_t, sparse=sparse,
                             trending=self.trending.top(), steps=self.steps,
                             created_at_ms=int(time.time() * 1000) if now_ms is None else now_ms,
                             trained_through_ms=trained_through_ms, trainer_epoch=trainer_epoch)
        data = encode_update(update)
        self.version += 1
        self._needs_full = False
        for mask in self._touched.values():
            mask.zero_()
        return data

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write model, estimator, optimiser state, trending and ``extra`` (JSON metadata,
        e.g. the next Kafka offsets to read and the serialised histories) as one file,
        atomically. Only table rows that ever changed are stored (the rest is the seeded init)."""
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, table in self.model.tables().items():
                rows = self._ever[name].nonzero().flatten()
                tensors[f"rows/{name}"] = rows
                tensors[f"values/{name}"] = table[rows].clone()
            tensors |= {f"dense/{k}": v.detach() for k, v in self.model.dense().items()}
        tensors |= {f"estimator/{k}": v for k, v in self.estimator.state().items()}
        tensors |= {f"sparse_optim/{k}": v for k, v in self._sparse_opt.state().items()}
        optim_json: dict[str, dict[str, Any]] = {}
        dense_state = self._dense_opt.state_dict()["state"] if self._dense_opt is not None else {}
        for idx, st in dense_state.items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"optim/{idx}/{key}"] = val
                else:
                    optim_json.setdefault(str(idx), {})[key] = val
        tensors["rng/downsample"] = self._gen.get_state()
        header = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                  "config": self.config.to_dict(), "version": self.version, "steps": self.steps,
                  "trending": self.trending.to_json(), "optim": optim_json,
                  "rng_negatives": _rng_state_json(self._rng), "extra": extra or {}}
        try:
            json.dumps(header)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"extra must be JSON-serialisable: {exc}") from None
        atomic_write(Path(path), dumps(tensors, header))

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`checkpoint`; returns its ``extra``.

        Refuses a checkpoint whose structural settings (shapes, seed, estimator size)
        differ from this trainer's. Learning rates and other knobs come from this
        trainer's config. The next export is a full update.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
        return self.restore_bytes(data, str(path))

    def restore_bytes(self, data: bytes, path: str = "checkpoint") -> dict[str, Any]:
        """:meth:`restore` from the checkpoint's bytes (a data-parallel job's rank 0 sends them to
        the other ranks); ``path`` names them in errors."""
        try:
            _, header = read_layout(data)
            tensors = loads(data)
        except SafeIOError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
        if header.get("format") != CHECKPOINT_FORMAT or header.get("format_version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path} is not a streamrecall checkpoint (format {header.get('format')!r})")
        if not isinstance(header.get("config"), dict):
            raise CheckpointError(f"checkpoint {path} has no config")
        saved = ModelConfig.from_dict(header["config"])
        for name in (*self.config.structural(), "estimator_buckets", "estimator_hashes"):
            if getattr(saved, name) != getattr(self.config, name):
                raise CheckpointError(f"checkpoint has {name}={getattr(saved, name)!r}, "
                                      f"this trainer {getattr(self.config, name)!r}")
        try:
            self._load(tensors, header)
        except (KeyError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {path} is inconsistent: {exc}") from None
        return header.get("extra", {})

    def _load(self, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
        with torch.no_grad():
            self.model.reset()
            for name, table in self.model.tables().items():
                rows, values = tensors[f"rows/{name}"], tensors[f"values/{name}"]
                table[rows] = values
                self._ever[name].zero_()
                self._ever[name][rows] = True
                self._touched[name].zero_()
            for k, v in self.model.dense().items():
                v.copy_(tensors[f"dense/{k}"])
        self.estimator.load_state({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("estimator/")})
        self._sparse_opt.load_state({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("sparse_optim/")})
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, key = k.split("/", 2)
                state.setdefault(int(idx), {})[key] = v
        for idx, st in header.get("optim", {}).items():
            state.setdefault(int(idx), {}).update(st)
        if self._dense_opt is not None:
            self._dense_opt.load_state_dict({"state": state,
                                             "param_groups": self._dense_opt.state_dict()["param_groups"]})
        self._gen.set_state(tensors["rng/downsample"])
        self._rng.setstate(_rng_state_from_json(header["rng_negatives"]))
        self.trending = TrendingCounter.from_json(header["trending"])
        self.version = int(header["version"])
        self.steps = int(header["steps"])
        self._needs_full = True


def _rng_state_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_state_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
