"""The indexer's background thread: re-encodes items after model updates, measures recall.

The poll loop applies a model update to the replica and hands the re-encode here, so it
keeps indexing new items while this thread works, and queries are served throughout:

* **new epoch** (the dense layers changed value: every vector is stale) — the index is
  rebuilt into a fresh graph beside the live one, with the stale items encoded by the
  towers as they are while it builds, and swapped in atomically (``ItemIndex.reencode`` with
  a rebuild threshold of 0; writes made meanwhile are replayed onto the fresh graph). Dense
  layers may change with every update, so rebuilds start at most every
  ``rebuild_interval_s`` and keep the thread busy at most ``rebuild_busy_share`` of the time
  (:meth:`Reencoder.rebuild_wait`), and a build runs to its end even when newer epochs arrive
  meanwhile (the next build takes them): abandoning builds would mean never finishing one.
  Answers do not wait for it: the API re-scores graph candidates with the current towers
  (``consumers/roles/indexer/scoring.py``), so the graph's lag only decides which items are candidates.
* **sparse rows moved** (a delta, or a full update compared row by row with the replica's own:
  :class:`~streamrecall.model.Applied`'s ``moved``) — work in proportion to the effect, in two steps:

  1. a **drift pass** (:meth:`Reencoder._measure`) over the items on moved rows: each is encoded by
     the current towers and compared with the vector the index holds; the relative drift goes into
     ``state.drift`` (``streamrecall.index.drift``). The moved rows of every update queued meanwhile
     are merged, so one pass covers them all; passes start at most every ``drift_interval_s``
     and keep the thread busy at most ``rebuild_busy_share`` of the time (:meth:`drift_wait`).
  2. a **budgeted writer** (:meth:`spend`) re-encodes at most ``reencode_items_per_s`` items a
     second in place: drift above ``reencode_drift_bound`` first, the most retrieved of those
     first, then the rest by drift. An HNSW update costs about 8 inserts, and measured on the
     default stream every delta moved the content-token rows of nearly every item, mostly by a
     little: rewriting each touched vector was most of the indexer's CPU.

Each step holds the state's lock for one bounded batch (``reencode_batch`` items), so the
poll loop waits at most one batch. Jobs run in version order; ``settled_version`` is the
latest version whose re-encode is complete (every item it moved measured and, for those still
queued, not yet: the version before the oldest queued item went stale) — snapshots record it so
a restart re-measures only what was not finished (see ``consumers/roles/indexer/``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from streamrecall.consumers.roles.indexer.state import IndexerState, batches, now_ms
from streamrecall.events import Item
from streamrecall.index import EntryMeta, QualityMonitor
from streamrecall.index.drift import EXACT, relative_drift
from streamrecall.model.replica import Applied, merge_moved

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Re-encode work caused by the update of ``version``: everything (``moved`` None: a new epoch)
    or the items on the sparse rows it moved (by table)."""

    version: int
    moved: Mapping[str, torch.Tensor] | None = None

    @property
    def everything(self) -> bool:
        return self.moved is None


class _Superseded(Exception):
    """Shutdown, or a newer epoch for a drift pass, made the running job pointless."""


#: Retrieval counts halve this often, so "most retrieved" follows the last minutes' traffic.
RETRIEVAL_DECAY_S = 60.0


class Reencoder:
    def __init__(self, state: IndexerState, monitor: QualityMonitor, settled_version: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.monitor = monitor
        self.clock = clock
        self._measured_version = settled_version  # every update up to it has had its drift pass
        self._jobs: "queue.Queue[Job]" = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="indexer-reencoder", daemon=True)
        self._last_quality = clock()
        self._last_rebuild = float("-inf")  # when the last rebuild started (monotonic)
        self._last_rebuild_s = 0.0          # how long it took
        self._moved: list[Job] = []         # sparse jobs waiting for the next drift pass
        self._last_pass = float("-inf")
        self._last_pass_s = 0.0
        self._tokens = 0.0                  # re-encodes the budget allows now
        self._last_budget = clock()
        self._last_decay = clock()

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
        """Jobs submitted and not finished (a sparse job finishes with its drift pass)."""
        with self._pending_lock:
            return self._pending

    @property
    def idle(self) -> bool:
        """No job waiting and no drifted item queued: the index holds the current towers' vectors."""
        return self.pending == 0 and len(self.state.drift) == 0

    @property
    def settled_version(self) -> int:
        """The newest version whose re-encode is complete: its drift pass ran, and no item still
        queued went stale at or before it."""
        oldest = self.state.drift.oldest_version()
        return self._measured_version if oldest is None else min(self._measured_version, oldest - 1)

    def run_queued(self) -> None:
        """Run every queued job on the calling thread, then re-encode every drifted item, whatever the
        pacing and the budget (for tests and tools; the role uses the thread)."""
        while True:
            try:
                first = self._jobs.get_nowait()
            except queue.Empty:
                break
            for job in self._coalesce([first]):
                self._run(job)
        self._measure_moved()
        while self.spend(self.state.config.reencode_batch):
            pass
        self._note_current()

    # ----------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                job = None
            if job is not None:
                jobs = self._coalesce([job])
                wait = self.rebuild_wait(self.clock())
                if jobs[0].everything and wait > 0:  # a rebuild is due later: take what arrives meanwhile too
                    if self._stop.wait(wait):
                        return
                    jobs = self._coalesce(jobs)
                for j in jobs:
                    if self._stop.is_set():
                        return
                    self._run(j)
            if self._moved and self.drift_wait(self.clock()) <= 0:
                self._measure_moved()
            self._spend_budget()
            self._note_current()
            self._maybe_measure()

    def _note_current(self) -> None:
        """Vouch that the index holds the current towers' vectors when nothing is left to do (the
        query fast path, ``RecallService._search_settled``). Read ``pending`` first: a job submitted
        after it has already moved the replica past ``_measured_version``."""
        if self.pending == 0 and len(self.state.drift) == 0:
            self.state.current_as_of = self._measured_version

    def rebuild_wait(self, now: float) -> float:
        """Seconds until the next rebuild may start (≤ 0: now). A rebuild starts at most every
        ``rebuild_interval_s``, and no sooner than its last duration / ``rebuild_busy_share`` after
        the last one started: at 1M items a build takes minutes, and back-to-back builds would keep
        a core busy for good, competing with queries and new items. While it waits, answers are
        still exact (re-scored by the current towers); only the graph's candidates age."""
        config = self.state.config
        spacing = max(config.rebuild_interval_s, self._last_rebuild_s / config.rebuild_busy_share)
        return self._last_rebuild + spacing - now

    def drift_wait(self, now: float) -> float:
        """Seconds until the next drift pass may start (≤ 0: now): at most every ``drift_interval_s``,
        and no sooner than the last pass's duration / ``rebuild_busy_share`` after it started (a pass
        encodes every item on a moved row: at 1M items, seconds)."""
        config = self.state.config
        spacing = max(config.drift_interval_s, self._last_pass_s / config.rebuild_busy_share)
        return self._last_pass + spacing - now

    def _coalesce(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` and everything queued; work before the last new-epoch job is dropped (that rebuild redoes it)."""
        jobs = list(jobs)
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        last_all = max((i for i, j in enumerate(jobs) if j.everything), default=-1)
        if last_all >= 0:
            dropped = jobs[:last_all] + self._moved
            self._moved = []
            if dropped:
                log.info("re-encode: %d queued job(s) superseded by the new epoch of version %d",
                         len(dropped), jobs[last_all].version)
                self._done(len(dropped))
            return jobs[last_all:]
        return jobs

    def _run(self, job: Job) -> None:
        if not job.everything:
            self._moved.append(job)  # measured by the next drift pass, with the others queued by then
            return
        started = self.clock()
        try:
            n = self._rebuild(job.version)
        except _Superseded:
            log.info("re-encode for version %d abandoned: superseded", job.version)
            self._done(1)
            return
        except Exception:  # keep the thread alive; the stale-ratio gauge shows what was not done
            log.exception("re-encode for version %d failed; its items keep their previous vectors", job.version)
            self._done(1)
            return
        # the graph now holds this epoch (or a later one's vectors, built meanwhile): nothing drifts
        self.state.served_epoch = max(self.state.served_epoch, job.version)
        self.state.drift.clear()
        self._measured_version = max(self._measured_version, job.version)
        self._done(1)
        log.info("re-encode for version %d done: %d item(s) in %.1fs (rebuild)", job.version, n,
                 self.clock() - started)

    def _done(self, n: int) -> None:
        with self._pending_lock:
            self._pending -= n

    # ----------------------------------------------------------- the work
    def _rebuild(self, version: int) -> int:
        state = self.state

        self._last_rebuild = self.clock()

        def encode(ids: list[str]) -> np.ndarray:
            if self._stop.is_set():
                raise _Superseded()
            with state.lock:
                # An id missing from the catalog was deleted after the build began; the index
                # replays that delete onto the fresh graph, so any finite vector will do here.
                items = [state.catalog.get(i) or Item(item_id=i, created_at=0) for i in ids]
                return state.replica.encode_items(items)

        n = state.index.reencode(encode, version, batch_size=state.config.reencode_batch, rebuild_threshold=0.0)
        self._last_rebuild_s = self.clock() - self._last_rebuild
        state.metrics.upserts.labels("rebuild").inc(n)
        return n

    def _measure_moved(self) -> None:
        """One drift pass for every sparse job queued so far (their moved rows merged)."""
        if not self._moved:
            return
        jobs, self._moved = self._moved, []
        version = jobs[-1].version
        started = self._last_pass = self.clock()
        try:
            n, drifted = self._measure(version, merge_moved(*(j.moved or {} for j in jobs)))
        except _Superseded:
            log.info("drift pass for version %d abandoned: superseded", version)
            self._done(len(jobs))
            return
        except Exception:  # keep the thread alive; the next pass measures the items again
            log.exception("drift pass for version %d failed; its items keep their previous vectors", version)
            self._done(len(jobs))
            return
        self._last_pass_s = self.clock() - started
        self._measured_version = max(self._measured_version, version)
        self._done(len(jobs))
        log.info("drift pass for version %d done (%d update(s)): %d item(s) measured, %d drifted, in %.2fs",
                 version, len(jobs), n, drifted, self._last_pass_s)

    def _measure(self, version: int, moved: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """Measure the drift of every item on a ``moved`` row; returns (measured, drifted)."""
        state = self.state
        if not any(rows.numel() for rows in moved.values()):
            return 0, 0
        applied = Applied("applied", version, "delta", False, moved)
        with state.lock:
            snapshot = list(state.catalog.values())
        measured = drifted = 0
        for chunk in batches(snapshot, state.config.reencode_batch):
            if self._stop.is_set() or state.epoch_of(version) != state.current_epoch:
                raise _Superseded()  # shutdown, or a newer epoch: its rebuild re-encodes everything
            with state.lock:
                live = [it for it in chunk if state.catalog.get(it.item_id) is it]  # not replaced or deleted since
                touched = set(state.replica.items_touched(applied, live)) if live else set()
                items = [it for it in live if it.item_id in touched]
                if not items:
                    continue
                found, stored = state.index.vectors([it.item_id for it in items])
                items = [it for it, f in zip(items, found.tolist()) if f]
                drift = relative_drift(stored, state.replica.encode_items(items))
                state.drift.record([it.item_id for it in items], drift, state.replica.version, now_ms())
            measured += len(items)
            drifted += int(np.count_nonzero(drift > EXACT))
        state.metrics.drift_measured.inc(measured)
        return measured, drifted

    def _spend_budget(self) -> None:
        """Re-encode what ``reencode_items_per_s`` allows since the last call (a burst of at most one
        second's budget accrues while nothing drifted), written in batches of ``reencode_batch``."""
        rate = self.state.config.reencode_items_per_s
        now = self.clock()
        self._tokens = min(max(rate, 1.0), self._tokens + (now - self._last_budget) * rate)
        self._last_budget = now
        state = self.state
        queued = len(state.drift)
        if queued and self._tokens >= max(1.0, min(queued, rate)):
            # a second's budget at a time: ordering the queue is O(queue) (about 0.3 s for a million
            # drifted items on a loaded core, docs/benchmarks.md), so once a second at most
            ids = state.drift.take(int(self._tokens), state.config.reencode_drift_bound, state.retrievals)
            for chunk in batches(ids, state.config.reencode_batch):
                if self._stop.is_set():
                    break
                self._tokens -= self._reencode(list(chunk))
        if now - self._last_decay >= RETRIEVAL_DECAY_S:
            self._last_decay = now
            self.state.retrievals.decay()

    def spend(self, n: int) -> int:
        """Re-encode in place the first ``n`` drifted items in priority order (``DriftQueue.take``);
        returns how many were taken (deleted ones are dropped from the queue and count)."""
        state = self.state
        return self._reencode(state.drift.take(n, state.config.reencode_drift_bound, state.retrievals))

    def _reencode(self, ids: list[str]) -> int:
        """Re-encode ``ids`` in place with the current towers and drop them from the drift queue."""
        state = self.state
        if not ids:
            return 0
        with state.lock:
            items = [it for i in ids if (it := state.catalog.get(i)) is not None and i in state.index]
            if items:
                vectors = state.replica.encode_items(items)
                at, current = now_ms(), state.replica.version
                metas = [EntryMeta(current, at, it.created_at, tuple(it.categories)) for it in items]
                state.index.upsert([it.item_id for it in items], vectors, metas)
            state.drift.discard(ids)
        state.metrics.upserts.labels("reencode").inc(len(items))
        return len(ids)

    def _maybe_measure(self) -> None:
        if self.clock() - self._last_quality < self.state.config.quality_interval_s:
            return
        self._last_quality = self.clock()
        try:
            report = self.monitor.measure()
        except Exception:
            log.exception("quality measurement failed")
            return
        if report.sampled:
            self.state.metrics.recall_at_10.set(report.recall_at_10)
