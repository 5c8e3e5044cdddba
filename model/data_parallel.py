"""Data-parallel training: N processes take one step together on the global batch.

Each rank holds a disjoint share of the clicks of a step (at most ``batch_size / N``); the
*global batch* is the shares concatenated in rank order. One step of
:class:`DataParallelTrainer` on every rank computes what one :class:`OnlineTrainer` step on
the global batch would:

- **The clicks are all-gathered** (a few dozen bytes each, UTF-8 JSON of our own making,
  never pickle), so every rank feeds the frequency estimator, the users' recent histories,
  trending and down-sampling the *whole global batch in rank order*. They are therefore
  identical on every rank and equal to those of one process fed the same clicks in that
  order (``tests/model/test_model_data_parallel.py`` checks this exactly).
- **In-batch negatives come from the global batch.** Each rank encodes its own share's items
  and users; the item vectors are all-gathered, each rank's users score every column, and the
  gradient reaching the gathered columns is all-reduced and fed back to each rank's own rows
  (the backward of an all-gather), so a rank's item rows learn from every rank's users. The
  loss is normalised by the global weight, so the ranks' gradients sum to the single-process one.
- **Sparse rows: replicated tables, combined updates.** Each rank's sparse gradient (the rows
  its share touched) is all-gathered; every rank sums the same rows in the same (rank) order
  and applies the same row-wise Adagrad step, so the tables stay bit-identical without ever
  sending a table. Row sharding would send the same row gradients (to their owner) plus the
  looked-up rows back every step, and make every rank's export a gather; at this model's
  sizes a step's touched rows are a few MB (docs/benchmarks.md), so replication is simpler
  and no slower. Dense gradients (the two towers' MLPs; the FM has none) are all-reduced.

Every branch that decides whether a collective runs depends only on data every rank holds
(the gathered clicks), so the ranks call the same collectives in the same order. Mixed
negatives (``mixed_negatives``) are drawn by each rank for its own rows from its own catalog.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from streamrecall.model.batch import ClickLike, TrainBatch
from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import ModelError
from streamrecall.model.features import ItemLike
from streamrecall.model.history import RecentHistory
from streamrecall.model.loss import sampled_softmax_loss
from streamrecall.model.trainer import OnlineTrainer


@dataclass(frozen=True, slots=True)
class SharedClick:
    """A click as another rank sent it (what training reads of a click)."""

    user_id: str
    item_id: str
    ts: int
    weight: float = 1.0


def encode_clicks(clicks: Sequence[ClickLike]) -> bytes:
    return json.dumps([[c.user_id, c.item_id, int(c.ts), float(c.weight)] for c in clicks],
                      separators=(",", ":")).encode()


def decode_clicks(data: bytes) -> list[SharedClick]:
    return [SharedClick(str(u), str(i), int(t), float(w)) for u, i, t, w in json.loads(data)]


class Collective:
    """The collectives a data-parallel step needs, over one torch.distributed process group.

    Every call is collective: every rank of the group must make it, in the same order, with
    tensors of the same dtype (and the same trailing shape where rows are gathered).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def join(cls, *, rank: int, world_size: int, master_addr: str, master_port: int,
             timeout_s: float, backend: str = "gloo") -> "Collective":
        """Join the job's process group (rank 0 listens on ``master_addr:master_port``). A rank that
        does not answer a collective within ``timeout_s`` fails the others' (they exit; the job restarts)."""
        if not 0 <= rank < world_size:
            raise ModelError(f"rank must be in [0, {world_size}), got {rank}")
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def gather_ints(self, values: Sequence[int]) -> torch.Tensor:
        """(world_size, len(values)) int64: every rank's ``values`` (same length on every rank)."""
        mine = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return torch.stack(out)

    def gather_rows(self, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every rank's ``rows`` (its first dimension is ``counts[rank]``, known to all) concatenated
        in rank order. Padded to the largest count, since all_gather moves equal shapes."""
        width = max(max(counts), 1)
        padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype)
        padded[:rows.shape[0]] = rows
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, counts)])

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` in rank order (two collectives: the lengths, then the bytes)."""
        lengths = self.gather_ints([len(data)])[:, 0].tolist()
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        joined = self.gather_rows(raw, lengths).numpy().tobytes()
        out, at = [], 0
        for n in lengths:
            out.append(joined[at:at + n])
            at += n
        return out

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every rank (what the others pass is ignored)."""
        size = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size[0]), dtype=torch.uint8)
        if self.rank == 0 and data:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if buf.numel():
            dist.broadcast(buf, src=0)
        return buf.numpy().tobytes()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum over ranks) and return it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


@dataclass(frozen=True)
class GlobalStep:
    """What one collective step saw: each rank's share of the global batch (``sizes``, rank order),
    the training metrics (those of :meth:`OnlineTrainer.step`, plus ``own_examples``: this rank's
    share of the examples), and the payload bytes this rank put into the step's collectives."""

    sizes: tuple[int, ...]
    metrics: dict[str, float]
    comm_bytes: int  # bytes this rank sent in the step's collectives (payloads, padding included)

    @property
    def clicks(self) -> int:
        return sum(self.sizes)


class DataParallelTrainer(OnlineTrainer):
    """An :class:`OnlineTrainer` whose steps are collective over ``comm`` (module docstring).

    Every rank starts from the same seeded model (or restores the same checkpoint), so the
    replicated state stays identical as long as every rank takes every step.
    """

    def __init__(self, config: ModelConfig | None, comm: Collective) -> None:
        super().__init__(config)
        dims = {t.shape[1] for t in self.model.tables().values()}
        if len(dims) != 1:
            raise ModelError(f"data-parallel training needs tables of one width, got {sorted(dims)}")
        self.comm = comm
        self._global_loss = 0.0

    def global_step(self, share: Sequence[ClickLike], items: Mapping[str, ItemLike],
                    history: RecentHistory) -> GlobalStep:
        """One step on the global batch, of which ``share`` is this rank's part (possibly empty).

        ``history`` is the replicated recent history: it records the whole global batch, in rank
        order, and each click trains with its user's history before it, as in one process.
        """
        comm, rank = self.comm, self.comm.rank
        payload = encode_clicks(share)
        shares = [decode_clicks(b) for b in comm.gather_bytes(payload)]
        sent = 8 + len(payload)
        sizes = tuple(len(s) for s in shares)
        clicks = [c for s in shares for c in s]
        n = len(clicks)
        start = sum(sizes[:rank])
        zero = {"loss": 0.0, "examples": 0.0, "skipped": float(n), "downsampled": 0.0, "unknown_items": 0.0,
                "own_examples": 0.0, "steps": float(self.steps), "version": float(self.version)}
        if n == 0:
            return GlobalStep(sizes, zero, sent)
        histories = history.before_each(clicks)
        keys = torch.tensor([self.featurizer.item_key(c.item_id) for c in clicks], dtype=torch.int64)
        # The global stream, in rank order, on every rank: identical estimators, trending and draws.
        self.estimator.update(keys)
        p = self.estimator.probability(keys)
        self.trending.add(c.item_id for c in clicks if c.item_id in items)
        weights = torch.tensor([float(c.weight) for c in clicks], dtype=torch.float32)
        keep, keep_p, downsampled = self._keep(weights, p)
        kept = keep.nonzero().flatten()
        counts = [int(((kept >= sum(sizes[:r])) & (kept < sum(sizes[:r + 1]))).sum()) for r in range(len(sizes))]
        mine = kept[(kept >= start) & (kept < start + sizes[rank])] - start
        local = self.make_batch(shares[rank], items, histories[start:start + sizes[rank]])
        # examples, skipped, downsampled: the global batch's; own_examples, unknown_items: this rank's share's.
        metrics = {"examples": float(kept.numel()), "skipped": float(n - kept.numel()),
                   "downsampled": float(downsampled), "unknown_items": float(local.unknown_items),
                   "own_examples": float(mine.numel())}
        if kept.numel() == 0:
            return GlobalStep(sizes, zero | metrics, sent)
        expected = (n * p * keep_p)[kept]  # see OnlineTrainer.step
        loss, step_bytes = self._optimise_global(local, mine, kept, keys, expected, weights[kept], counts)
        self.steps += 1
        return GlobalStep(sizes, metrics | {"loss": loss, "steps": float(self.steps), "version": float(self.version)},
                          sent + step_bytes)

    def _optimise_global(self, local: TrainBatch, mine: torch.Tensor, kept: torch.Tensor, keys: torch.Tensor,
                         expected: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> tuple[float, int]:
        """Forward the local rows against every rank's columns, backward, combine, apply."""
        cfg, comm, rank = self.config, self.comm, self.comm.rank
        offset, b = sum(counts[:rank]), counts[rank]
        dim = next(iter(self.model.tables().values())).shape[1]
        sent = 0
        users = local.users.select(mine)
        items = local.items.select(mine)
        v_local = self.model.item(items) if b else torch.zeros((0, dim))
        columns = comm.gather_rows(v_local.detach(), counts).requires_grad_()   # (K, d), rank order
        sent += 4 * dim * max(counts)
        neg = local.negatives
        log_q = neg_log_q = None
        if cfg.logq and cfg.logq_alpha > 0:
            uniform = len(neg) / max(local.catalog_size, 1) if neg is not None else 0.0
            log_q = cfg.logq_alpha * torch.log(expected + uniform)
            if neg is not None:
                neg_p = self.estimator.probability(neg.keys)
                neg_log_q = cfg.logq_alpha * torch.log(int(keys.shape[0]) * neg_p * self._keep_probability(neg_p) + uniform)
        self._sparse_opt.zero_grad()
        if self._dense_opt is not None:
            self._dense_opt.zero_grad(set_to_none=True)
        local_loss = torch.zeros(())
        if b:
            u = self.model.user(users)
            neg_v = self.model.item(neg) if neg is not None else None
            local_loss = sampled_softmax_loss(u, columns, temperature=cfg.softmax_temperature, item_keys=keys[kept],
                                              log_q=log_q, weights=weights[offset:offset + b], neg_item=neg_v,
                                              neg_keys=neg.keys if neg is not None else None, neg_log_q=neg_log_q,
                                              positive_offset=offset, weight_total=weights.sum())
            local_loss.backward()
        # The backward of the all-gather: every rank's users' gradient on every column, summed,
        # then each rank's own columns' part back through its item tower.
        grad = columns.grad if columns.grad is not None else torch.zeros_like(columns)
        comm.sum_(grad)
        sent += 4 * grad.numel()
        if b:
            v_local.backward(grad[offset:offset + b])
        sent += self._combine_sparse()
        sent += self._reduce_dense_and_loss(local_loss)
        self._sparse_opt.step(int(kept.numel()))
        if self._dense_opt is not None:
            self._dense_opt.step()
        return float(self._global_loss), sent

    def _combine_sparse(self) -> int:
        """All-gather every rank's sparse row gradients and set each table's gradient to their sum
        (the same rows, the same order, on every rank). Marks the combined rows as changed."""
        comm = self.comm
        tables = self.model.tables()
        parts = []
        for table in tables.values():
            if table.grad is None:
                parts.append((torch.empty(0, dtype=torch.int64), torch.empty((0, table.shape[1]))))
            else:
                g = table.grad.coalesce()
                parts.append((g.indices()[0], g.values()))
        counts = comm.gather_ints([len(r) for r, _ in parts])             # (world, tables)
        per_rank = counts.sum(dim=1).tolist()
        rows = comm.gather_rows(torch.cat([r for r, _ in parts]), per_rank)
        values = comm.gather_rows(torch.cat([v for _, v in parts]), per_rank)
        sent = 8 * len(tables) + max(per_rank) * (8 + 4 * values.shape[1])
        # Split the gathered rows back by rank, then by table, and sum each table's.
        at = 0
        table_rows: dict[str, list[torch.Tensor]] = {name: [] for name in tables}
        table_values: dict[str, list[torch.Tensor]] = {name: [] for name in tables}
        for r in range(comm.world_size):
            for j, name in enumerate(tables):
                k = int(counts[r, j])
                table_rows[name].append(rows[at:at + k])
                table_values[name].append(values[at:at + k])
                at += k
        for name, table in tables.items():
            idx = torch.cat(table_rows[name])
            if idx.numel() == 0:
                table.grad = None
                continue
            table.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), torch.cat(table_values[name]),
                                                 tuple(table.shape), check_invariants=False).coalesce()
            self._mark(name, table.grad.indices()[0])
        return sent

    def _reduce_dense_and_loss(self, local_loss: torch.Tensor) -> int:
        """One all-reduce of every dense gradient and the loss (the global loss is their sum)."""
        dense = list(self.model.dense().values())
        flat = torch.cat([local_loss.detach().reshape(1)] +
                         [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
        self.comm.sum_(flat)
        self._global_loss = float(flat[0])
        at = 1
        for p in dense:
            p.grad = flat[at:at + p.numel()].reshape(p.shape).clone()
            at += p.numel()
        return 4 * flat.numel()
