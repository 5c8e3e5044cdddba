"""The indexer role: items, model updates and user vectors in; an HNSW index and the recall API out.

Every replica reads every partition (``assign_all``): each holds the whole catalog.

Per polled batch the handler applies, in this order: model updates (so new items are
encoded by the newest tower), items (encoded in micro-batches and upserted; ``deleted``
removes them), user vectors (the latest per user, in memory). Re-encoding after a model
update runs in a background thread (``consumers/reencoder.py``) while the loop goes on.

**Durability.** The role's durable state is its snapshot (``consumers/indexer_snapshot.py``),
written every ``snapshot_interval_s`` from ``flush`` and once more at shutdown. Restart
resumes from the snapshot's offsets, never from the group's committed offsets: those are
still committed by the runtime after every flush, but only feed lag monitoring
(``streamrecall status``). So ``flush`` is cheap — it notes the offsets the next snapshot
covers — and a crash loses nothing: the records after the last snapshot are read again
(upserts and deletes are idempotent).

**Model updates** arrive in chunks (``consumers/update_chunks.py``) and go through the one
:class:`~streamrecall.consumers.updates.ModelUpdateStream`: a version is applied when its last
chunk is read, never in part. The model-updates offset a snapshot records is the next one to
read *that loses nothing*: the first record of a sequence still being read, else the runtime's
next offset. So a snapshot or a kill -9 in the middle of a sequence re-reads the whole version.

**Restart.** With ``--from committed`` (the default) the current snapshot is loaded, then the
model updates from the first record of the last *full* update the replica applied up to the
snapshot's model-updates offset are re-read before the poll loop starts, so the replica is
rebuilt exactly; updates up to the snapshot's ``settled_version`` re-encode nothing (the index
already holds their vectors), later ones re-encode as usual. Items resume at the
snapshot's offsets; ``user-vectors`` is re-read from the beginning. Any other ``--from``
starts from an empty index and reads as told.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers import indexer_snapshot
from streamrecall.consumers.app import deadletter_sink, model_config, run_handler
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.http_api import RecallService
from streamrecall.consumers.http_server import RecallApi
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.indexer_state import IndexerConfig, IndexerState, UserEntry
from streamrecall.consumers.reencoder import Job, Reencoder
from streamrecall.consumers.runtime import HandlerBase, Record, decode_value
from streamrecall.consumers.scoring import ServingMonitor
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.update_chunks import ChunkReader
from streamrecall.consumers.updates import ModelUpdateStream, update_max_bytes
from streamrecall.errors import StreamrecallError
from streamrecall.events import Decoder, Item, user_vector_decoder
from streamrecall.index import QualityMonitor
from streamrecall.metrics import MODEL_VERSION, RUNTIME, IndexerMetrics, ModelVersionMetrics, role_metrics
from streamrecall.model import ModelUpdate
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

ROLE = "indexer"


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
        #: next offsets to read, by (logical topic, partition): what the next snapshot covers
        self.next_offsets: dict[tuple[str, int], int] = {}
        if resume is not None:
            self.next_offsets.update({("items", int(p)): o for p, o in resume.items.items()})
            self.next_offsets.update({("model-updates", int(p)): o for p, o in resume.model_updates.items()})
        self._logical = {self.topics.items: "items", self.topics.model_updates: "model-updates",
                         self.topics.user_vectors: "user-vectors"}
        self.start_at: dict[TopicPartition, int] = {}
        self.assigned_partitions: set[tuple[str, int]] = set()
        self.last_snapshot = time.monotonic()
        self.started_ms = int(time.time() * 1000)  # records appended earlier are re-reads (freshness)
        self._last_gauges = 0.0
        self.started = threading.Event()
        self.updates = self.update_stream(lambda update, offset: self.apply_update(update, 0, offset),
                                          self._deadletter)

    # ---------------------------------------------------------- Handler protocol
    def start_offsets(self) -> Mapping[TopicPartition, int]:
        return dict(self.start_at)

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

    def flush(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Cheap: note what the next snapshot covers; snapshot when the interval is up."""
        for tp, offset in offsets.items():
            logical = self._logical[tp.topic]
            if logical == "model-updates":  # never the middle of a chunk sequence
                offset = self.updates.resume_offset(offset)
            if logical != "user-vectors":
                self.next_offsets[(logical, tp.partition)] = offset
        if self.deadletters is not None:
            self.deadletters.flush(30)
        if time.monotonic() - self.last_snapshot >= self.state.config.snapshot_interval_s:
            self.snapshot()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_gauges >= 1.0:
            self._last_gauges = now
            self.state.update_gauges()

    # ------------------------------------------------------------------- steps
    def update_stream(self, apply: Callable[[ModelUpdate, int], None],
                      deadletter: Callable[[DeadLetter], None]) -> ModelUpdateStream:
        """A model-update stream with this indexer's limits and key (the poll loop's, the replay's)."""
        return ModelUpdateStream(self.topics.model_updates, apply, deadletter,
                                 max_bytes=update_max_bytes(self.settings, self.state.replica.config),
                                 signing_key=self.settings.model_signing_key)

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
        if r.value is None:  # tombstone
            if r.key is not None:
                self.state.users.pop(r.key.decode("utf-8", "replace"), None)
            return
        self.state.users.put(r.value.user_id, UserEntry.of(r.value))

    def apply_update(self, update: ModelUpdate, partition: int, offset: int, *, reencode_above: int = -1) -> None:
        """Apply one model update (``offset``: its first record's) to the replica and queue the re-encode it causes.

        Updates with ``version <= reencode_above`` re-encode nothing (replay after a restart:
        the snapshot's index already holds their vectors).
        """
        state = self.state
        with state.lock, state.model_lock.write():
            applied = state.replica.apply(update)  # ModelUpdateError (wrong model) → dead letter
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
        self.version_metrics.version.labels(ROLE).set(applied.version)
        if applied.version <= reencode_above:
            return
        log.info("model update v%d (%s) applied: re-encoding %s", applied.version, applied.kind,
                 "everything (new epoch)" if applied.reencode_all else "the items it touches")
        self.reencoder.submit(Job(applied.version, None if applied.reencode_all else update))

    # --------------------------------------------------------------- snapshots
    def snapshot(self) -> Path:
        """Write the snapshot now (poll-loop thread: no item write runs meanwhile)."""
        self.last_snapshot = time.monotonic()
        state = self.state
        settled, served = self.reencoder.settled_version, state.served_epoch  # read before the index copy
        resume = indexer_snapshot.Resume(
            items={str(p): o for (t, p), o in self.next_offsets.items() if t == "items"},
            model_updates={str(p): o for (t, p), o in self.next_offsets.items() if t == "model-updates"},
            replica_version=state.replica.version, settled_version=settled, served_epoch=served,
            epochs=list(state.epochs),
            last_full_partition=state.last_full[0] if state.last_full else None,
            last_full_offset=state.last_full[1] if state.last_full else None)
        with state.lock:
            items = list(state.catalog.values())
        path = indexer_snapshot.write(self.root, state.index, items, resume)
        state.metrics.snapshot_time.set(time.time())
        log.debug("snapshot %s: %d items, v%d (settled v%d)", path.name, len(items), resume.replica_version, settled)
        return path

    # --------------------------------------------------------------- health
    def lag(self) -> dict[str, int] | None:
        """Records behind the high watermark per logical topic, from this run's lag gauge (None: not measured yet)."""
        seen: dict[tuple[str, str], float] = {}
        for metric in RUNTIME.lag.collect():
            for sample in metric.samples:
                if sample.labels.get("role") == ROLE:
                    seen[(sample.labels["topic"], sample.labels["partition"])] = sample.value
        out: dict[str, int] = {}
        for topic, partition in self.assigned_partitions:
            value = seen.get((topic, str(partition)))
            if value is None:
                return None
            out[topic] = out.get(topic, 0) + int(value)
        return out if self.assigned_partitions else None


class IndexerRole:
    """Builds the indexer's state (restoring the snapshot), its handler, re-encoder and API."""

    def __init__(self, settings: Settings, start: StartPosition, metrics: IndexerMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION) -> None:
        self.settings = settings
        # Its own producer for the dead letters of model updates: a broken chunk sequence is found
        # by the handler, after the runtime's decode (closed last, in close()).
        self.producer = make_producer(settings)
        self.deadletters = deadletter_sink(settings, ROLE, self.producer)
        self.start = start
        self.config = IndexerConfig.from_settings(settings)
        self.metrics = metrics if metrics is not None else role_metrics(IndexerMetrics)
        root = settings.role_state_dir(ROLE)
        loaded = indexer_snapshot.load(root) if start.kind == "committed" else None
        if start.kind != "committed" and indexer_snapshot.exists(root):
            log.info("indexer: --from %s: ignoring the snapshot under %s, starting from an empty index", start, root)
        self.state = IndexerState(self.config, model_config(settings), self.metrics,
                                  index=loaded.index if loaded else None,
                                  max_version_jump=settings.model_max_version_jump)
        resume = loaded.resume if loaded else None
        if loaded:
            self.state.catalog = loaded.catalog
            self.state.served_epoch = resume.served_epoch
            self.state.epochs = sorted(set(resume.epochs) | {0})
            log.info("indexer: snapshot loaded: %d items, model v%d (settled v%d)", len(loaded.catalog),
                     resume.replica_version, resume.settled_version)
        self.monitor = QualityMonitor(self.state.index)
        self.reencoder = Reencoder(self.state, self.monitor, settled_version=resume.settled_version if resume else 0)
        self.handler = IndexerHandler(settings, self.state, self.reencoder, version_metrics, resume,
                                      snapshot_loaded=loaded is not None, deadletters=self.deadletters)
        self.api: RecallApi | None = None
        self.service = RecallService(self.state, self.config, self.monitor, self.health)
        self.serving_monitor = ServingMonitor(self.service, self.service.sampler, self.config.overlap_interval_s,
                                              self.config.overlap_max_items)
        self.restored = False
        if start.kind == "committed":
            self._prepare_resume(resume)
        self.restored = True

    # ---------------------------------------------------------------- restart
    def _prepare_resume(self, resume: indexer_snapshot.Resume | None) -> None:
        """Explicit start offsets for every partition, and the replay of model updates."""
        t = self.settings.topics
        consumer = make_consumer(self.settings, None, client_id="streamrecall-indexer-restore")
        try:
            start_at: dict[TopicPartition, int] = {}
            for topic in (t.items, t.model_updates, t.user_vectors):
                for p in consumer.partitions_for_topic(topic) or ():
                    start_at[TopicPartition(topic, p)] = 0
            if resume is not None:
                start_at.update({TopicPartition(t.items, int(p)): o for p, o in resume.items.items()})
                start_at.update({TopicPartition(t.model_updates, int(p)): o for p, o in resume.model_updates.items()})
                if resume.last_full_offset is not None:
                    self._replay_updates(consumer, resume)
                self._reconcile()
            self.handler.start_at = start_at
        finally:
            consumer.close(autocommit=False)

    def _replay_updates(self, consumer: KafkaConsumer, resume: indexer_snapshot.Resume) -> None:
        tp = TopicPartition(self.settings.topics.model_updates, resume.last_full_partition or 0)
        stop = resume.model_updates.get(str(tp.partition), 0)
        start = resume.last_full_offset or 0
        if start >= stop:
            return
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + self.config.replay_timeout_s
        replayed = 0

        def apply(update: ModelUpdate, offset: int) -> None:
            nonlocal replayed
            self.handler.apply_update(update, tp.partition, offset, reencode_above=resume.settled_version)
            replayed += 1

        def skipped(letter: DeadLetter) -> None:  # dead-lettered when first read
            log.info("indexer: model update at %s skipped on replay (%s): %s", letter.where, letter.reason,
                     letter.error)

        # stop is a sequence boundary (the snapshot's resume offset), so every update before it is whole
        stream = self.handler.update_stream(apply, skipped)
        read_chunk = ChunkReader()
        while True:
            position = consumer.position(tp, timeout_ms=5000)
            high = consumer.highwater(tp)
            if position is not None and (position >= stop or (high is not None and position >= high)):
                break
            if time.monotonic() > deadline:
                raise StreamrecallError(f"indexer: could not re-read model updates {start}..{stop} of {tp.topic}"
                                        f"[{tp.partition}] within {self.config.replay_timeout_s:.0f}s")
            for messages in consumer.poll(timeout_ms=500).values():
                for m in messages:
                    if m.offset >= stop:
                        continue
                    try:
                        chunk = decode_value(read_chunk, m.value, f"{tp.topic}[{tp.partition}]@{m.offset}", m.headers)
                    except StreamrecallError as exc:  # dead-lettered when first read
                        log.info("indexer: model update at %s[%d]@%d skipped on replay: %s",
                                 tp.topic, tp.partition, m.offset, exc)
                        continue
                    stream.add(m.offset, chunk, m.key)
        if self.state.replica.version != resume.replica_version:
            log.warning("indexer: replayed model updates reach v%d, the snapshot was at v%d (topic truncated?)",
                        self.state.replica.version, resume.replica_version)
        log.info("indexer: replica rebuilt from %d model update(s) (offsets %d..%d), now v%d",
                 replayed, start, stop, self.state.replica.version)

    def _reconcile(self) -> None:
        """Make index and catalog hold the same ids (a crash between the two writes of a batch)."""
        state = self.state
        in_index = set(state.index.ids())
        missing = [it for i, it in state.catalog.items() if i not in in_index]
        orphans = [i for i in in_index if i not in state.catalog]
        if orphans:
            state.index.delete(orphans)
        if missing:
            state.upsert_items(missing)
        if missing or orphans:
            log.warning("indexer: snapshot reconciled: %d item(s) encoded, %d orphan vector(s) removed",
                        len(missing), len(orphans))

    # ----------------------------------------------------------------- wiring
    def topics(self) -> dict[str, tuple[str, Callable[[bytes | None], Any]]]:
        t = self.settings.topics
        limit = self.settings.max_value_bytes
        return {t.items: ("items", Decoder(Item, limit).decode),
                t.model_updates: ("model-updates", ChunkReader()),
                t.user_vectors: ("user-vectors", user_vector_decoder(limit))}

    def serve_http(self, stack: ExitStack, heartbeat: Heartbeat) -> None:
        self.api = RecallApi(self.service, self.settings.http_host, self.settings.port_for(ROLE),
                             self.config.max_body_bytes, admin_port=self.settings.admin_port_for(ROLE),
                             livez=heartbeat.answer)
        self.api.start()
        stack.callback(self.api.stop)

    def begin(self) -> None:
        """Start the background re-encoder (after the replay queued its work) and the serving monitor."""
        # The version series exists from the start (a replica that never applies an update must show
        # its skew against the trainer, not "no data").
        self.handler.version_metrics.version.labels(ROLE).set(self.state.replica.version)
        self.reencoder.start()
        self.serving_monitor.start()

    def close(self) -> None:
        """Stop the background threads, then write the final snapshot."""
        self.serving_monitor.stop()
        self.reencoder.stop()
        try:
            self.handler.snapshot()
        except Exception:
            log.exception("indexer: final snapshot failed; the previous one stays current")
        finally:
            self.producer.close(10)

    def health(self) -> tuple[bool, dict[str, Any]]:
        state = self.state
        lag = self.handler.lag()
        total = sum(lag.values()) if lag is not None else None
        reasons = []
        if not self.restored:
            reasons.append("restoring the snapshot")
        if lag is None:
            reasons.append("lag not measured yet")
        elif total > self.config.ready_max_lag:
            reasons.append(f"lag {total} records is above {self.config.ready_max_lag}")
        # Settled: this replica has read every model update there is and its re-encode is done, so
        # its graph holds the current model's vectors (answers are version-consistent regardless).
        settled = lag is not None and lag.get("model-updates", 0) == 0 and self.reencoder.idle
        body = {"ready": not reasons, "reasons": reasons, "settled": settled, "items": len(state.index),
                "model_version": state.replica.version, "served_epoch": state.served_epoch,
                "stale_share": state.index.stale_share(state.current_epoch),
                "model_trained_through_ms": state.replica.trained_through_ms,
                "settled_version": self.reencoder.settled_version, "reencode_pending": self.reencoder.pending,
                "user_vectors": len(state.users), "lag": total, "lag_by_topic": lag,
                "snapshot_loaded": self.handler.snapshot_loaded}
        return not reasons, body


def run(settings: Settings, start: StartPosition) -> None:
    """Run the indexer until SIGTERM/SIGINT; exit writes a final snapshot."""
    role = IndexerRole(settings, start)
    with ExitStack() as stack:
        stack.callback(role.close)  # runs last: after the runtime's final flush and the API's shutdown
        role.begin()
        run_handler(ROLE, settings, start, role.handler, role.topics(), assign_all=True,
                    serve_http=role.serve_http, stack=stack)
