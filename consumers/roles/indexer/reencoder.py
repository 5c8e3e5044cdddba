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
* **rows moved** (a delta, or a full update that left the dense layers as they were) — work in
  proportion to effect. A *drift pass* adds to each item's drift how far the moved rows may have
  moved its vector (``TowerReplica.items_drift``: its id row's shift plus its token rows' shifts,
  weighted as the tower pools them, over the vector's norm); nothing is encoded. Items whose drift
  exceeds ``reencode_drift_bound`` are then encoded, the most retrieved first, and rewritten in
  place only when their exact drift (the new vector against the stored one) passes the bound too:
  the estimate sums shifts, an upper bound that measured 4-12x the true move on synthetic streams,
  and the in-place write (about 8 inserts) is the cost, not the encode. At most
  ``reencode_items_per_s`` are rewritten (:meth:`Reencoder._drain`); writing an item resets its drift,
  keeping it sets it to the exact value. With the
  FM every step moves content-token rows shared by most items, so re-encoding every touched item
  meant rewriting nearly the whole index with every update. A queued job keeps only the moved rows
  and their shifts (``ChangedRows``), jobs queued behind a running one merge into one pass (shifts
  add up: an upper bound), and a pass reads the whole catalog (~5 µs an item), so passes keep the
  thread busy at most ``DRIFT_BUSY_SHARE``. When a pass leaves at least ``REBUILD_SHARE`` of the
  items over the bound — by the estimate, then by the exact drift of ``DRIFT_SAMPLE`` random items —
  and a rebuild may start (:meth:`Reencoder.rebuild_wait`), it rebuilds instead (an in-place update
  costs about 8 inserts, docs/index.md).

A step encodes one bounded batch (``reencode_batch`` items) without the state's lock and
takes the lock only to write, ``REWRITE_CHUNK`` items at a time, so the poll loop waits at most
that many in-place writes. Jobs run in version order; ``settled_version`` is the
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
from streamrecall.model.update import ChangedRows

log = logging.getLogger(__name__)

#: The recall@10 measurement keeps the re-encoder thread busy at most this share of the time.
QUALITY_BUSY_SHARE = 0.05

#: A delta pass that touches at least this share of the items rebuilds the graph instead of
#: rewriting them in place: an insert into a fresh graph costs about an eighth of an in-place update.
REBUILD_SHARE = 0.5
#: Drift passes keep the re-encoder thread busy at most this share of the time (a pass reads every
#: item of the catalog: about 5 s at a million items); the jobs arriving meanwhile merge into the next.
DRIFT_BUSY_SHARE = 0.25
#: Items featurised per step of a drift pass.
DRIFT_CHUNK = 8192
#: Drifted ids taken per refresh of the re-encode queue (the most retrieved first).
DRIFT_QUEUE = 8192
#: Retrieval counts halve every this many seconds, so "most retrieved" means lately.
RETRIEVED_HALF_LIFE_S = 600.0
#: In-place rewrites per hold of the state lock, which the poll loop waits for. An in-place write
#: costs about 8 inserts (docs/index.md): a thread taking the lock every 10 ms waited p99 50 ms behind
#: whole 256-item batches at 100k-300k items, 11-20 ms behind 64-item holds (docs/benchmarks.md).
REWRITE_CHUNK = 64
#: Random items whose exact drift decides whether a pass that estimates most items over the bound
#: rebuilds (±4% at 95% on the share).
DRIFT_SAMPLE = 512


@dataclass(frozen=True)
class Job:
    """Re-encode work caused by the update of ``version``: everything (``update`` None) or the drift
    of the items on the rows it moved (``Applied.changed``: the rows and their shifts, no values)."""

    version: int
    update: ChangedRows | None = None

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
        self.rebuilding = False             # a rebuild runs now (/healthz: queries meanwhile use the old graph)
        self._last_pass = float("-inf")     # when the last drift pass started, and how long it took
        self._last_pass_s = 0.0
        self._queue: list[str] = []         # drifted ids to re-encode, the most retrieved first
        self._queue_stale = True            # a pass or rebuild ran since the queue was read
        self._allowance = 0.0               # re-encodes the budget allows now (a token bucket)
        self._last_fill = time.monotonic()
        self._last_decay = time.monotonic()

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

    def run_queued(self, drain: bool = True) -> None:
        """Run every queued job on the calling thread, then (``drain``) re-encode every item over the
        drift bound regardless of the budget (for tests and tools; the role uses the thread)."""
        while True:
            try:
                first = self._jobs.get_nowait()
            except queue.Empty:
                break
            for job in self._coalesce([first]):
                self._run(job)
        while drain and self._drain(budget=False):
            pass

    # ----------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.05 if self._queue or self._queue_stale else 0.5)
            except queue.Empty:
                while self._jobs.empty() and self._drain() and not self._stop.is_set():
                    pass
                self._maybe_measure()
                continue
            jobs = self._coalesce([job])
            now = time.monotonic()
            wait = self.rebuild_wait(now) if jobs[0].everything else self.pass_wait(now)
            if wait > 0:  # take what arrives meanwhile too (re-encoding drifted items until then)
                until = now + wait
                while time.monotonic() < until and not self._stop.is_set():
                    if not self._drain():
                        self._stop.wait(min(0.05, max(0.0, until - time.monotonic())))
                if self._stop.is_set():
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

    def pass_wait(self, now: float) -> float:
        """Seconds until the next drift pass may start (≤ 0: now); see ``DRIFT_BUSY_SHARE``."""
        return next_start(self._last_pass, self._last_pass_s, 0.0, DRIFT_BUSY_SHARE) - now

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
            n = self._rebuild(job.version) if job.everything else self._drift_pass(job.version, job.update)
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
                 time.monotonic() - started, "rebuild" if job.everything or n else "drift pass")

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
            # Without the state lock: an item changed or deleted after the build began is written
            # by the poll loop meanwhile, and the index replays that write onto the fresh graph, so
            # any finite vector will do here.
            items = [state.catalog.get(i) or Item(item_id=i, created_at=0) for i in ids]
            return state.encode_current(items)[0]

        self.rebuilding = True
        try:
            n = state.index.reencode(encode, version, batch_size=state.config.reencode_batch, rebuild_threshold=0.0)
        finally:
            self.rebuilding = False
            self._queue_stale = True
        self._last_rebuild_s = time.monotonic() - self._last_rebuild
        state.metrics.upserts.labels("rebuild").inc(n)
        return n

    def _drift_pass(self, version: int, changed: ChangedRows | None) -> int:
        """Add the drift ``changed`` causes to every item it touches; rebuild when most items are then
        over the bound and a rebuild may start. Returns the items re-encoded (by a rebuild)."""
        state = self.state
        if changed is None or state.epoch_of(version) != state.current_epoch:
            return 0  # a later epoch re-encodes everything
        self._last_pass = time.monotonic()
        try:
            with state.lock:
                snapshot = list(state.catalog.values())
            for chunk in batches(snapshot, DRIFT_CHUNK):
                if self._stop.is_set() or state.epoch_of(version) != state.current_epoch:
                    raise _Superseded()
                drift = state.replica.items_drift(changed, chunk)  # reads the featurizer, not the towers
                moved = np.flatnonzero(drift > 0)
                if len(moved):
                    state.index.add_drift([chunk[i].item_id for i in moved.tolist()], drift[moved],
                                          below_version=version)
        finally:
            self._last_pass_s = time.monotonic() - self._last_pass
            self._queue_stale = True
        bound = state.config.reencode_drift_bound
        _, over = state.index.drift_stats(bound)
        # Most items over the bound: a fresh graph costs less than rewriting them in place. Only when a
        # rebuild may start now: waiting for one left the graph on old vectors meanwhile (streamrecall
        # evaluate, default stream: live HR@50 0.322 -> 0.299), so meanwhile the budget re-encodes in place.
        if over < REBUILD_SHARE or self.rebuild_wait(time.monotonic()) > 0:
            return 0
        # the estimate is an upper bound: ask the sample what really moved
        sample = random.Random(version).sample(snapshot, min(DRIFT_SAMPLE, len(snapshot)))
        vectors, encoded_by = state.encode_current(sample)
        with state.lock:  # a sample an update overtook measures nothing: in place, as before a rebuild
            held = self._still_current(sample) if state.replica.version == encoded_by else []
            exact = state.index.measure_drift([sample[j].item_id for j in held], vectors[held])
        true_over = float(np.mean(~(exact <= bound))) if len(exact) else 0.0  # NaN (not indexed yet) counts as over
        if true_over < REBUILD_SHARE:
            log.info("re-encode for version %d: %.0f%% of the items over the drift bound by the estimate, "
                     "%.0f%% of %d sampled by their exact drift: rewriting in place", version, 100 * over,
                     100 * true_over, len(exact))
            return 0
        log.info("re-encode for version %d: %.0f%% of the items over the drift bound (%.0f%% of %d sampled), "
                 "rebuilding", version, 100 * over, 100 * true_over, len(exact))
        return self._rebuild(version)

    def _drain(self, budget: bool = True) -> bool:
        """Encode one batch of the items over the drift bound, the most retrieved first, and rewrite
        those whose exact drift passes it too, within the budget (``reencode_items_per_s`` rewrites, a
        token bucket holding at most one second of it). Returns whether it took a batch."""
        state, config = self.state, self.state.config
        now = time.monotonic()
        rate = config.reencode_items_per_s
        self._allowance = min(rate, self._allowance + rate * (now - self._last_fill))
        self._last_fill = now
        n = config.reencode_batch if not budget else min(config.reencode_batch, int(self._allowance))
        if n < 1 or (budget and n < min(config.reencode_batch, rate)):  # wait for a whole batch
            return False
        if self._queue_stale or not self._queue:
            if now - self._last_decay >= RETRIEVED_HALF_LIFE_S / 10:
                state.index.decay_retrieved(0.5 ** ((now - self._last_decay) / RETRIEVED_HALF_LIFE_S))
                self._last_decay = now
            self._queue = state.index.drifted(config.reencode_drift_bound, DRIFT_QUEUE)[::-1]  # pop() takes the first
            self._queue_stale = False
            if not self._queue:
                return False
        ids = [self._queue.pop() for _ in range(min(n, len(self._queue)))]
        if state.served_epoch != state.current_epoch:
            self._queue_stale = True  # a rebuild is due: it re-encodes everything
            return False
        # Read and encoded without the state lock (a dict read is atomic); the writes below check
        # each item is still the catalog's and no update landed meanwhile.
        items = [it for it in (state.catalog.get(i) for i in ids) if it is not None]
        if not items:
            return bool(ids)
        vectors, encoded_by = state.encode_current(items)
        written = kept = 0
        for start in range(0, len(items), REWRITE_CHUNK):
            with state.lock:
                if state.replica.version != encoded_by or state.served_epoch != state.current_epoch:
                    self._queue_stale = True  # an update landed: the drifted items are read again
                    break
                held = start + np.asarray(self._still_current(items[start:start + REWRITE_CHUNK]),
                                          dtype=np.intp)
                exact = state.index.measure_drift([items[j].item_id for j in held], vectors[held])
                write = held[~(exact <= config.reencode_drift_bound)]  # NaN: not in the index, write it
                if len(write):
                    at = now_ms()
                    chosen = [items[j] for j in write.tolist()]
                    metas = [EntryMeta(encoded_by, at, it.created_at, tuple(it.categories)) for it in chosen]
                    state.index.upsert([it.item_id for it in chosen], vectors[write], metas)
            written += len(write)
            kept += len(held) - len(write)
            time.sleep(0)  # let a waiting poll loop in: released and taken again at once, the lock stayed ours
        self._allowance -= written
        state.metrics.upserts.labels("reencode").inc(written)
        state.metrics.drift_checks.labels("rewritten").inc(written)
        state.metrics.drift_checks.labels("kept").inc(kept)
        return True

    def _still_current(self, items: list[Item]) -> list[int]:
        """Positions of ``items`` the catalog still holds as they are (call with the state lock held):
        an item replaced or deleted while it was encoded is the poll loop's to write."""
        catalog = self.state.catalog
        return [j for j, it in enumerate(items) if catalog.get(it.item_id) is it]

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
