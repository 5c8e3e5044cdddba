"""The indexer's handler: items, model updates and user vectors applied to the indexer's state, per polled batch."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from kafka import TopicPartition

from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.lag import measured_lag
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.recall_api.users import apply_user_record
from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
from streamrecall.consumers.roles.indexer.options import ROLE
from streamrecall.consumers.roles.indexer.pacing import next_start
from streamrecall.consumers.roles.indexer.reencoder import Job, Reencoder
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.consumers.update_codec import update_max_bytes
from streamrecall.consumers.updates import ModelUpdateStream
from streamrecall.events import Item
from streamrecall.metrics import MODEL_VERSION, RUNTIME, ModelVersionMetrics
from streamrecall.model import ModelUpdate
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

#: An update that waited this long for its locks is logged (with which lock held it).
LOCK_WAIT_LOG_S = 0.1

#: Snapshots keep the poll loop busy at most this share of the time (they hold the interpreter lock
#: while the graph is copied and the catalog encoded: seconds at a million items).
SNAPSHOT_BUSY_SHARE = 0.05



class IndexerHandler(HandlerBase):
    """The poll loop's side of the indexer (runs on the runtime's thread)."""

    def __init__(self, settings: Settings, state: IndexerState, reencoder: Reencoder,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION, resume: indexer_snapshot.Resume | None = None,
                 snapshot_loaded: bool = False, deadletters: DeadLetterSink | None = None) -> None:
        self.settings = settings
        self.deadletters = deadletters  # broken or refused model updates (None: logged only, in unit tests)
        self.state = state
        self.reencoder = reencoder
        self.version_metrics = version_metrics
        self.topics = settings.topics
        self.root = settings.role_state_dir(ROLE)
        self.snapshot_loaded = snapshot_loaded
        #: next offsets to read of items and model-updates: what the next snapshot covers
        self.next_offsets = resume.next_offsets() if resume is not None else Offsets()
        self._logical = {self.topics.items: "items", self.topics.model_updates: "model-updates",
                         self.topics.user_vectors: "user-vectors"}
        self.start_at = Offsets()  # where this run starts (the wiring sets it from the snapshot)
        self.assigned_partitions: set[tuple[str, int]] = set()
        self.last_snapshot = time.monotonic()
        self.last_snapshot_s = 0.0  # how long the last snapshot took
        self.started_ms = int(time.time() * 1000)  # records appended earlier are re-reads (freshness)
        self._last_gauges = 0.0
        self.started = threading.Event()
        # the poll loop's stream stages a big full update off the loop (tick() applies it when ready)
        self.updates = self.update_stream(lambda update, offset: self.apply_update(update, 0, offset),
                                          self._deadletter, prepare=state.replica.prepare)

    # ---------------------------------------------------------- Handler protocol
    def start_offsets(self) -> Offsets:
        return self.start_at

    def assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            key = (self._logical[tp.topic], tp.partition)
            self.assigned_partitions.add(key)
            RUNTIME.lag.remove(ROLE, key[0], str(key[1]))  # readiness waits for this run's own lag reading
        self.started.set()

    def revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned_partitions.discard((self._logical[tp.topic], tp.partition))

    def handle(self, records: list[Record]) -> None:
        updates = [r for r in records if r.topic == "model-updates"]
        items = [r for r in records if r.topic == "items"]
        users = [r for r in records if r.topic == "user-vectors"]
        for r in updates:
            self.updates.add(r.offset, r.value, r.key)
        if items:
            self._items(items)
        for r in users:
            self._user(r)

    def flush(self, offsets: Offsets) -> None:
        """Cheap: note what the next snapshot covers; snapshot when the interval is up."""
        for (topic, partition), offset in offsets.items():
            if topic == "model-updates":  # never the middle of a chunk sequence
                offset = self.updates.resume_offset(offset)
            if topic != "user-vectors":
                self.next_offsets.set(topic, partition, offset)
        # copying the graph holds the interpreter lock (hnswlib's copy): 1.5 s at 600k items here
        if time.monotonic() >= next_start(self.last_snapshot, self.last_snapshot_s,
                                          self.state.config.snapshot_interval_s, SNAPSHOT_BUSY_SHARE):
            self.snapshot()

    def tick(self) -> None:
        self.updates.pump()
        now = time.monotonic()
        if now - self._last_gauges >= 1.0:
            self._last_gauges = now
            self.state.update_gauges()

    # ------------------------------------------------------------------- steps
    def update_stream(self, apply: Callable[[ModelUpdate, int], None], deadletter: Callable[[DeadLetter], None], *,
                      prepare: Callable[[ModelUpdate], None] | None = None) -> ModelUpdateStream:
        """A model-update stream with this indexer's limits and key (the poll loop's, the replay's)."""
        return ModelUpdateStream(self.topics.model_updates, apply, deadletter,
                                 max_bytes=update_max_bytes(self.settings, self.state.replica.config),
                                 signing_key=self.settings.model_signing_key, prepare=prepare, role=ROLE)

    def _deadletter(self, letter: DeadLetter) -> None:
        if self.deadletters is not None:
            self.deadletters.send(letter, "model-updates")
        else:
            log.error("model update at %s refused (%s): %s", letter.where, letter.reason, letter.error)

    def _items(self, records: list[Record]) -> None:
        latest: dict[str, Item] = {}
        appended: dict[str, int] = {}
        for r in records:  # a later event for the same id wins
            latest.pop(r.value.item_id, None)
            latest[r.value.item_id] = r.value
            appended[r.value.item_id] = r.timestamp_ms
        deleted = [i for i, it in latest.items() if it.deleted]
        live = [it for it in latest.values() if not it.deleted]
        # Freshness counts events new to this indexer that reached the topic while it ran: a record
        # appended before the process started is a replay or a restart's backlog (that shows as lag).
        fresh = {it.item_id for it in live if appended[it.item_id] >= self.started_ms and self.state.is_new(it)}
        if deleted:
            self.state.delete_items(deleted)
        if live:
            self.state.upsert_items(live, fresh)

    def _user(self, r: Record) -> None:
        apply_user_record(self.state.users, r.key, r.value)

    def apply_update(self, update: ModelUpdate, partition: int, offset: int, *, reencode_above: int = -1) -> None:
        """Apply one model update (``offset``: its first record's) to the replica and queue the re-encode it causes.

        Updates with ``version <= reencode_above`` re-encode nothing (replay after a restart:
        the snapshot's index already holds their vectors).
        """
        state = self.state
        asked = time.perf_counter()
        with state.lock:
            locked = time.perf_counter()
            with state.model_lock.write():  # waits for the queries and re-encodes reading the towers
                writing = time.perf_counter()
                applied = state.replica.apply(update)  # ModelUpdateError (wrong model) → dead letter
        if writing - asked >= LOCK_WAIT_LOG_S:  # item ingest waited as long (the poll loop is here)
            log.info("model update v%d waited %.2fs for the state lock and %.2fs for the towers' readers",
                     update.version, locked - asked, writing - locked)
        if applied.status == "gap":
            log.warning("model update v%d (base v%d) at model-updates[%d]@%d does not follow v%d: skipped; "
                        "vectors stay at v%d until the next full update", update.version, update.base_version,
                        partition, offset, applied.version, applied.version)
            return
        if applied.status == "duplicate":
            log.info("model update v%d at model-updates[%d]@%d already applied (at v%d): skipped",
                     update.version, partition, offset, applied.version)
            return
        if update.kind == "full":
            state.last_full = (partition, offset)
        if applied.reencode_all:
            state.start_epoch(applied.version)
        state.version_times[applied.version] = update.created_at_ms or int(time.time() * 1000)
        self.version_metrics.version.labels(ROLE).set(applied.version)
        if applied.version <= reencode_above:
            return
        log.info("model update v%d (%s) applied: re-encoding %s", applied.version, applied.kind,
                 "everything (new epoch)" if applied.reencode_all else "the items it moves")
        self.reencoder.submit(Job(applied.version, applied.changed))

    # --------------------------------------------------------------- snapshots
    def snapshot(self) -> Path:
        """Write the snapshot now (poll-loop thread: no item write runs meanwhile)."""
        self.last_snapshot = started = time.monotonic()
        state = self.state
        settled, served = self.reencoder.settled_version, state.served_epoch  # read before the index copy
        resume = indexer_snapshot.Resume(
            offsets=self.next_offsets.to_json(),
            replica_version=state.replica.version, settled_version=settled, served_epoch=served,
            epochs=list(state.epochs),
            last_full_partition=state.last_full[0] if state.last_full else None,
            last_full_offset=state.last_full[1] if state.last_full else None)
        with state.lock:
            items = list(state.catalog.values())
        path = indexer_snapshot.write(self.root, state.index, items, resume)
        self.last_snapshot_s = time.monotonic() - started
        state.metrics.snapshot_time.set(time.time())
        log.debug("snapshot %s: %d items, v%d (settled v%d)", path.name, len(items), resume.replica_version, settled)
        return path

    # --------------------------------------------------------------- health
    def lag(self) -> dict[str, int] | None:
        """Records behind the high watermark per logical topic, from this run's lag gauge (None: not measured yet)."""
        return measured_lag(ROLE, self.assigned_partitions)
