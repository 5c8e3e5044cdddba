"""The indexer's background thread: re-encodes items after model updates, measures recall.

The poll loop applies a model update to the replica and hands the re-encode here, so it
keeps indexing new items while this thread works, and queries are served throughout:

* **new epoch** (full update or new dense layers: every vector is stale) — the index is
  rebuilt into a fresh graph beside the live one, with the stale items encoded by the
  towers as they are while it builds, and swapped in atomically (``ItemIndex.reencode`` with
  a rebuild threshold of 0; writes made meanwhile are replayed onto the fresh graph). Dense
  layers may change with every update, so rebuilds start at most every
  ``rebuild_interval_s`` and keep the thread busy at most ``rebuild_busy_share`` of the time
  (:meth:`Reencoder.rebuild_wait`), and a build runs to its end even when newer epochs arrive
  meanwhile (the next build takes them): abandoning builds would mean never finishing one.
  Answers do not wait for it: the API re-scores graph candidates with the current towers
  (``consumers/roles/indexer/scoring.py``), so the graph's lag only decides which items are candidates.
* **delta** (sparse rows only) — ``TowerReplica.items_touched`` picks the items whose id or
  content-token rows changed; only those are re-encoded and upserted in place. A queued delta
  keeps only its changed rows (``ChangedRows``), and the deltas queued behind a running job are
  merged into one pass at the newest version: at a million items a rebuild takes minutes, and
  deltas arrive several a second. When a pass touches at least ``REBUILD_SHARE`` of the items and
  a rebuild may start (:meth:`Reencoder.rebuild_wait`), it rebuilds instead (an in-place update
  costs about 8 inserts, docs/index.md).

Each step holds the state's lock for one bounded batch (``reencode_batch`` items), so the
poll loop waits at most one batch. Jobs run in version order; ``settled_version`` is the
latest version whose re-encode is complete — snapshots record it so a restart re-encodes
only what was not finished (see ``consumers/roles/indexer/``).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from streamrecall.consumers.roles.indexer.pacing import next_start
from streamrecall.consumers.roles.indexer.state import IndexerState, batches, now_ms
from streamrecall.events import Item
from streamrecall.index import EntryMeta, QualityMonitor
from streamrecall.model.update import ChangedRows, ModelUpdate

log = logging.getLogger(__name__)

#: The recall@10 measurement keeps the re-encoder thread busy at most this share of the time.
QUALITY_BUSY_SHARE = 0.05

#: A delta pass that touches at least this share of the items rebuilds the graph instead of
#: rewriting them in place: an insert into a fresh graph costs about an eighth of an in-place update.
REBUILD_SHARE = 0.5
#: Items sampled to estimate the share a delta pass touches.
TOUCHED_SAMPLE = 2048


@dataclass(frozen=True)
class Job:
    """Re-encode work caused by the update of ``version``: everything (``update`` None) or the items
    on the rows it changed (the handler queues a :class:`ChangedRows`, the rows without values)."""

    version: int
    update: ChangedRows | ModelUpdate | None = None

    @property
    def everything(self) -> bool:
        return self.update is None


class _Superseded(Exception):
    """Shutdown, or a newer epoch for a delta's in-place re-encode, made the running job pointless."""


class Reencoder:
    def __init__(self, state: IndexerState, monitor: QualityMonitor, settled_version: int = 0) -> None:
        self.state = state
        self.monitor = monitor
        self.settled_version = settled_version
        self._jobs: "queue.Queue[Job]" = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="indexer-reencoder", daemon=True)
        self._last_quality = time.monotonic()
        self._last_quality_s = 0.0  # how long the last measurement took
        self._last_rebuild = float("-inf")  # when the last rebuild started (monotonic)
        self._last_rebuild_s = 0.0          # how long it took

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current batch (a running rebuild is abandoned; the next start redoes it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("re-encoder still busy after %.0fs; exiting without waiting", timeout_s)

    def submit(self, job: Job) -> None:
        with self._pending_lock:
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        with self._pending_lock:
            return self._pending

    @property
    def idle(self) -> bool:
        return self.pending == 0

    def run_queued(self) -> None:
        """Run every queued job on the calling thread (for tests and tools; the role uses the thread)."""
        while True:
            try:
                first = self._jobs.get_nowait()
            except queue.Empty:
                return
            for job in self._coalesce([first]):
                self._run(job)

    # ----------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                self._maybe_measure()
                continue
            jobs = self._coalesce([job])
            wait = self.rebuild_wait(time.monotonic())
            if jobs[0].everything and wait > 0:  # a rebuild is due later: take what arrives meanwhile too
                if self._stop.wait(wait):
                    return
                jobs = self._coalesce(jobs)
            for j in jobs:
                if self._stop.is_set():
                    return
                self._run(j)
            self._maybe_measure()

    def rebuild_wait(self, now: float) -> float:
        """Seconds until the next rebuild may start (≤ 0: now). A rebuild starts at most every
        ``rebuild_interval_s``, and no sooner than its last duration / ``rebuild_busy_share`` after
        the last one started: at 1M items a build takes minutes, and back-to-back builds would keep
        a core busy for good, competing with queries and new items. While it waits, answers are
        still exact (re-scored by the current towers); only the graph's candidates age."""
        config = self.state.config
        return next_start(self._last_rebuild, self._last_rebuild_s, config.rebuild_interval_s,
                          config.rebuild_busy_share) - now

    def _coalesce(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` and everything queued; work before the last new-epoch job is dropped (that rebuild redoes it)."""
        jobs = list(jobs)
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        last_all = max((i for i, j in enumerate(jobs) if j.everything), default=0)
        dropped = jobs[:last_all]
        if dropped:
            log.info("re-encode: %d queued job(s) superseded by the new epoch of version %d",
                     len(dropped), jobs[last_all].version)
            self._done(len(dropped))
        jobs = jobs[last_all:]
        head, deltas = (jobs[:1], jobs[1:]) if jobs[0].everything else ([], jobs)
        if len(deltas) > 1:  # one pass at the newest version re-encodes what each would have
            self._done(len(deltas) - 1)
            deltas = [Job(deltas[-1].version, ChangedRows.of(*(j.update for j in deltas if j.update is not None)))]
        return head + deltas

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        try:
            n = self._rebuild(job.version) if job.everything else self._touched(job.version, job.update)
        except _Superseded:
            log.info("re-encode for version %d abandoned: superseded", job.version)
            self._done(1)
            return
        except Exception:  # keep the thread alive; the stale-ratio gauge shows what was not done
            log.exception("re-encode for version %d failed; its items keep their previous vectors", job.version)
            self._done(1)
            return
        if job.everything:  # the graph now holds this epoch (or a later one's vectors, built meanwhile)
            self.state.served_epoch = max(self.state.served_epoch, job.version)
        self.settled_version = max(self.settled_version, job.version)
        self._done(1)
        log.info("re-encode for version %d done: %d item(s) in %.1fs (%s)", job.version, n,
                 time.monotonic() - started, "rebuild" if job.everything else "touched items")

    def _done(self, n: int) -> None:
        with self._pending_lock:
            self._pending -= n

    # ----------------------------------------------------------- the work
    def _rebuild(self, version: int) -> int:
        state = self.state

        self._last_rebuild = time.monotonic()

        def encode(ids: list[str]) -> np.ndarray:
            if self._stop.is_set():
                raise _Superseded()
            with state.lock:
                # An id missing from the catalog was deleted after the build began; the index
                # replays that delete onto the fresh graph, so any finite vector will do here.
                items = [state.catalog.get(i) or Item(item_id=i, created_at=0) for i in ids]
                return state.replica.encode_items(items)

        n = state.index.reencode(encode, version, batch_size=state.config.reencode_batch, rebuild_threshold=0.0)
        self._last_rebuild_s = time.monotonic() - self._last_rebuild
        state.metrics.upserts.labels("rebuild").inc(n)
        return n

    def _touched(self, version: int, update: ChangedRows | ModelUpdate | None) -> int:
        state = self.state
        if update is None or state.epoch_of(version) != state.current_epoch:
            return 0  # a later epoch re-encodes everything
        with state.lock:
            snapshot = list(state.catalog.values())
            sample = random.Random(version).sample(snapshot, min(len(snapshot), TOUCHED_SAMPLE))
            share = len(state.replica.items_touched(update, sample)) / len(sample) if sample else 0.0
        # Most items: a fresh graph costs less than rewriting them in place. Only when a rebuild may
        # start now: waiting for one left the graph on old vectors meanwhile (streamrecall evaluate,
        # default stream: live HR@50 0.322 -> 0.299), so a paced pass rewrites in place as before.
        if share >= REBUILD_SHARE and self.rebuild_wait(time.monotonic()) <= 0:
            log.info("re-encode for version %d: about %.0f%% of the items touched, rebuilding", version, 100 * share)
            return self._rebuild(version)
        done = 0
        for chunk in batches(snapshot, state.config.reencode_batch):
            if self._stop.is_set() or state.epoch_of(version) != state.current_epoch:
                raise _Superseded()
            with state.lock:
                live = [it for it in chunk if state.catalog.get(it.item_id) is it]  # not replaced or deleted since
                touched = set(state.replica.items_touched(update, live)) if live else set()
                items = [it for it in live if it.item_id in touched]
                if not items:
                    continue
                vectors = state.replica.encode_items(items)
                at, current = now_ms(), state.replica.version
                metas = [EntryMeta(current, at, it.created_at, tuple(it.categories)) for it in items]
                state.index.upsert([it.item_id for it in items], vectors, metas)
            done += len(items)
            state.metrics.upserts.labels("reencode").inc(len(items))
        return done

    def _maybe_measure(self) -> None:
        # the exact search reads every live vector: about 5 s of one core at a million items
        if time.monotonic() < next_start(self._last_quality, self._last_quality_s,
                                         self.state.config.quality_interval_s, QUALITY_BUSY_SHARE):
            return
        self._last_quality = time.monotonic()
        try:
            report = self.monitor.measure()
        except Exception:
            log.exception("quality measurement failed")
            return
        finally:
            self._last_quality_s = time.monotonic() - self._last_quality
        if report.sampled:
            self.state.metrics.recall_at_10.set(report.recall_at_10)
