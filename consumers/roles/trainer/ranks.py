"""One rank of a data-parallel trainer job (``--world-size N --rank R``; docs/roles.md).

The job's N processes are joined by torch.distributed (gloo). Rank R reads the clicks
partitions p with p % N == R, assigned by hand (no group rebalancing across ranks), and
buffers them; the ranks then train **together**, one collective step at a time
(:class:`~streamrecall.model.data_parallel.DataParallelTrainer`).

- **A round per loop iteration.** Every rank's ``tick`` runs one *round*: a small
  all-gather of each rank's buffered count and flags. A round trains when any rank has a full
  share (``ceil(batch_size / N)``) or a share whose oldest click waited ``max_batch_wait_ms``,
  and then takes as many steps as the fullest buffer needs; in each, every rank contributes up
  to a share, an idle rank an empty one. Ranks poll at most ``rank_poll_ms`` per iteration, so
  an idle rank keeps a busy one waiting at most about that long per round.
- **Rank 0 publishes** model updates (the others have no update producer) and is the only rank
  that scans model-updates for the version and fencing epoch, so only the job's rank 0 can
  publish a version, and a newer job's rank 0 fences an older one (docs/security.md).
- **One checkpoint for the job**, written by rank 0 right after a round's steps: the model,
  estimator, histories (replicated, so rank 0's are everyone's) and the next offset to read of
  *every* partition, gathered from the ranks in the same round. Its offsets are of clicks
  trained: a click buffered but not yet stepped on is read again after a restart.
- **Start.** Rank 0 reads the checkpoint and broadcasts it; every rank restores the same bytes,
  so ranks need no shared disk. Each resumes its partitions from the checkpoint's offsets (any
  world size: every partition's offset is in it).
- **Stop.** A rank that stops (SIGTERM) sends a stop flag in its last round; every rank takes
  the round's remaining steps, rank 0 checkpoints, and all leave together. A rank that dies
  (SIGKILL) fails the others' next collective (at once on a closed connection, else after
  ``collective_timeout_s``); they exit without checkpointing and the job restarts from the last
  checkpoint: at-least-once, nothing lost.
- **Commits** (lag monitoring, ``streamrecall status``): each rank commits, per partition, the
  offsets of clicks trained in steps that rank 0 has published and seen acknowledged (rank 0
  says how far in every round), so zero lag still means the learning is on model-updates.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

from streamrecall.consumers.handler import Record
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.roles.trainer.handler import TrainerHandler
from streamrecall.errors import StreamrecallError, TransientError
from streamrecall.model.data_parallel import DataParallelTrainer

log = logging.getLogger(__name__)

#: Fields of a round's all-gathered row, before the offsets.
_COUNT, _READY, _STOP, _CHECKPOINT, _PUBLISHED = range(5)


class RankFailure(StreamrecallError):
    """A collective failed: a peer rank died or stopped answering. This rank exits without
    checkpointing (its replicated state may be part-way through a step); the job restarts from
    the last checkpoint."""


def rank_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """The clicks partitions rank ``rank`` of ``world_size`` reads: p % world_size == rank."""
    return [p for p in partitions if p % world_size == rank]


class NoUpdates:
    """The update sink of a rank other than 0: it has nothing to send (only rank 0 publishes)."""

    def send(self, data: bytes, kind: str, version: int) -> None:
        raise RuntimeError("only rank 0 publishes model updates")

    def failed(self) -> bool:
        return False

    def flush(self) -> None:
        pass


class RankedTrainerHandler(TrainerHandler):
    """A :class:`TrainerHandler` whose training steps are collective over the job's ranks.

    ``partitions`` are every clicks partition (the checkpoint holds all their offsets);
    ``own`` those this rank reads.
    """

    def __init__(self, trainer: DataParallelTrainer, *args: Any, own: list[int], **kwargs: Any) -> None:
        super().__init__(trainer, *args, **kwargs)
        self.dp = trainer
        self.rank, self.world_size = trainer.comm.rank, trainer.comm.world_size
        self.own = list(own)
        self.share = math.ceil(self.options.batch_size / self.world_size)
        self._records: list[tuple[int, int, Any]] = []   # (partition, offset, click) read, not yet trained
        self._records_since = 0.0
        self._positions: dict[int, int] = {}              # next offset read, per own partition
        self._trained: deque[tuple[int, dict[int, int]]] = deque(maxlen=4096)  # (steps, safe offsets) per round
        self._published_steps = -1                        # rank 0's trainer steps acknowledged on model-updates
        self._publish_steps = 0                           # rank 0: trainer steps the last publish covered
        self.finished = False                             # every rank left together: the loop stops
        self._broken = False

    # --- state ------------------------------------------------------------------------
    def restore(self) -> bool:
        """Rank 0 reads the checkpoint (if any) and sends it to every rank; all restore the same bytes."""
        data = self.checkpoint_path.read_bytes() if self.rank == 0 and self.checkpoint_path.exists() else b""
        data = self._collective(lambda: self.dp.comm.broadcast_bytes(data))
        if not data:
            log.info("rank %d: no checkpoint on rank 0: training from the seeded model, clicks from the beginning",
                     self.rank)
            return False
        self._restore_extra(self.trainer.restore_bytes(data, f"rank 0's {self.checkpoint_path}"))
        return True

    def start_offsets(self) -> Offsets:
        """The checkpoint's next offsets of this rank's partitions (0 without a checkpoint)."""
        self._positions = {p: self.offsets.get("clicks", p) or 0 for p in self.own}
        return Offsets({("clicks", p): o for p, o in self._positions.items()})

    # --- the runtime's calls -------------------------------------------------------------
    def handle(self, records: list[Record]) -> None:
        for r in records:
            if not self._records:
                self._records_since = self.clock()
            self._records.append((r.partition, r.offset, r.value))
            self._positions[r.partition] = max(self._positions.get(r.partition, 0), r.offset + 1)

    def tick(self) -> None:
        self.poll_items()
        if not self.finished:
            self._round(stop=False)
        if self.rank == 0:
            self._maybe_publish()

    def flush(self, offsets: Offsets) -> Offsets:
        """Rank 0 publishes what the steps trained and waits for the acknowledgement; every rank
        returns the offsets to commit: those of clicks trained in steps rank 0 has published."""
        for p, o in offsets.of("clicks").items():  # covers dead-lettered records too
            self._positions[p] = max(self._positions.get(p, 0), o)
        if self._broken:
            raise TransientError("a peer rank failed: nothing is committed; the job restarts from its checkpoint")
        if self.rank == 0:
            self._publish_and_wait()
        self._fill()
        return self._committable()

    def shutdown(self) -> None:
        """At exit: the last round (with the stop flag), then rank 0 publishes what is unpublished."""
        if self._broken:
            log.error("rank %d: not checkpointing after a failed collective; the job restarts from the last "
                      "checkpoint", self.rank)
            return
        if not self.finished:
            self._round(stop=True)
        if self.rank == 0:
            if self._steps_since_publish:
                self.publish()
            self.sink.flush()

    def publish(self) -> int:
        if self.rank != 0:
            raise RuntimeError("only rank 0 publishes model updates")
        self._publish_steps = self.trainer.steps
        return super().publish()

    # --- rounds ------------------------------------------------------------------------
    def _round(self, stop: bool) -> None:
        """One round (module docstring): agree, take the steps, checkpoint if rank 0 asked or anyone stops."""
        waited = bool(self._records) and \
            self.clock() - self._records_since >= self.options.max_batch_wait_ms / 1000
        ready = len(self._records) >= self.share or waited
        due = self.rank == 0 and self.clock() - self._last_checkpoint >= self.options.checkpoint_every_s
        row = [len(self._records), int(ready), int(stop), int(due), self._published_steps if self.rank == 0 else -1]
        table = self._collective(lambda: self.dp.comm.gather_ints(row))
        self._published_steps = max(self._published_steps, int(table[0, _PUBLISHED]))
        anyone_stops = bool(table[:, _STOP].any())
        steps = 0
        if bool(table[:, _READY].any()) or anyone_stops:
            steps = math.ceil(int(table[:, _COUNT].max()) / self.share)
        for _ in range(steps):
            self._step()
        if steps:
            self._trained.append((self.trainer.steps, self._safe_offsets()))
        if bool(table[0, _CHECKPOINT]) or anyone_stops:
            self._job_checkpoint(anyone_stops)
        if anyone_stops:
            self.finished = True
            log.info("rank %d: rank(s) %s stopped; the job leaves together", self.rank,
                     table[:, _STOP].nonzero().flatten().tolist())

    def _step(self) -> None:
        started = self.clock()
        taken, self._records = self._records[:self.share], self._records[self.share:]
        if self._records:
            self._records_since = started
        shares = [c for _, _, c in taken]
        result = self._collective(lambda: self.dp.global_step(shares, self.items, self.history))
        if not taken:
            self.metrics.empty_shares.inc()
        self.metrics.collective_bytes.inc(result.comm_bytes)
        self.clicks_trained += result.clicks
        if shares:  # every rank's trained_through_ms is its own; rank 0's travels in updates
            self.trained_through_ms = max(self.trained_through_ms, max(c.ts for c in shares))
        self._steps_since_publish += 1
        # Summed over the ranks, the counters are the job's: each rank counts its own share's
        # examples, and rank 0 counts the steps (every rank takes every one).
        m, r = self.metrics, result.metrics
        if self.rank == 0:
            m.steps.inc()
        m.examples.inc(r["own_examples"])
        m.unknown_items.inc(r["unknown_items"])
        m.loss.set(r["loss"])
        m.step_seconds.observe(self.clock() - started)

    def _safe_offsets(self) -> dict[int, int]:
        """Per own partition, the next offset to read that loses nothing: the first click still
        buffered, else the position read."""
        out = dict(self._positions)
        for p, offset, _ in self._records:
            out[p] = min(out.get(p, offset), offset)
        return out

    def _job_checkpoint(self, final: bool) -> None:
        """Every rank's safe offsets to rank 0, which writes the one checkpoint of the job (an idle
        job's rank 0 does not rewrite it, but for the last one)."""
        safe = self._safe_offsets()
        n = len(self.partitions)
        index = {p: i for i, p in enumerate(self.partitions)}
        row = [-1] * n
        for p, o in safe.items():
            if p in index:
                row[index[p]] = o
        table = self._collective(lambda: self.dp.comm.gather_ints(row))
        if self.rank != 0:
            self._last_checkpoint = self.clock()
            return
        for i, p in enumerate(self.partitions):
            got = [int(o) for o in table[:, i].tolist() if o >= 0]
            if got:
                self.offsets.set("clicks", p, max(got))
        if final or self._checkpointed != (self.clicks_trained, self.offsets):
            self.checkpoint()
        else:  # nothing new: the last checkpoint still holds
            self._last_checkpoint = self.clock()

    def _publish_and_wait(self) -> None:
        if (self._steps_since_publish or self._force_full) and self._may_publish():
            self.publish()
        self.sink.flush()  # waits for every acknowledgement
        failed = self._check_sink()
        if not failed and not (self._steps_since_publish or self._force_full):
            self._failures_in_a_row = 0
            self._published_steps = self._publish_steps
        if self._steps_since_publish or self._force_full:
            raise TransientError(f"learning is not on model-updates yet ({self._failures_in_a_row} failed "
                                 "publish(es) in a row): the click offsets it covers stay uncommitted")

    def _committable(self) -> Offsets:
        """The offsets of the newest round whose steps rank 0 has published."""
        best: dict[int, int] | None = None
        while self._trained and self._trained[0][0] <= self._published_steps:
            best = self._trained.popleft()[1]
        if best is None:
            return Offsets()
        if self._trained:  # keep it for the next flush: later rounds build on it
            self._trained.appendleft((self._published_steps, best))
        return Offsets({("clicks", p): o for p, o in best.items()})

    def _collective(self, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # gloo: a peer closed its connection or timed out
            self._broken = True
            raise RankFailure(f"rank {self.rank} of {self.world_size}: a collective failed ({exc}); a peer rank "
                              "died or stopped answering: exiting so the job restarts from its last checkpoint") from None
