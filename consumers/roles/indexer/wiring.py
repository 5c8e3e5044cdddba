"""The indexer process assembled in one place: state (from its snapshot), handler, re-encoder, HTTP API."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers.assembly import RoleAssembly, model_config
from streamrecall.consumers.clients import make_consumer
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.deadletter import DeadLetter
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
from streamrecall.consumers.roles.indexer.handler import IndexerHandler
from streamrecall.consumers.roles.indexer.http_api import RecallService
from streamrecall.consumers.recall_api.server import RecallApi
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.indexer.options import ROLE, IndexerOptions
from streamrecall.consumers.roles.indexer.reencoder import Reencoder
from streamrecall.consumers.roles.indexer.scoring import ServingMonitor
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.consumers.handler import decode_value
from streamrecall.consumers.lag import lag_reasons
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.update_chunks import ChunkReader
from streamrecall.errors import ConfigError, StreamrecallError
from streamrecall.events import Decoder, Item, user_vector_decoder
from streamrecall.index import QualityMonitor
from streamrecall.metrics import MODEL_VERSION, ModelVersionMetrics, role_metrics
from streamrecall.model import ModelUpdate
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


class IndexerRole:
    """Builds the indexer's state (restoring the snapshot), its handler, re-encoder and API."""

    def __init__(self, process: RoleAssembly, start: StartPosition, metrics: IndexerMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION) -> None:
        settings = self.settings = process.settings
        # The process's one dead-letter sink: a broken chunk sequence is found by the handler, after
        # the runtime's decode, and dead-lettered through the sink the runtime flushes.
        self.deadletters = process.deadletters
        self.start = start
        self.config = IndexerOptions.from_settings(settings)
        #: (I, N) on shard I of a sharded index; None when this indexer holds every item
        self.shard = (settings.shard, settings.shards) if settings.shard is not None else None
        if self.shard is not None:
            self._check_shard_partitions()
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
            self.state.replace_catalog(loaded.catalog)
            self.state.served_epoch = resume.served_epoch
            self.state.epochs = sorted(set(resume.epochs) | {0})
            log.info("indexer: snapshot loaded: %d items, model v%d (settled v%d)", len(loaded.catalog),
                     resume.replica_version, resume.settled_version)
        self.monitor = QualityMonitor(self.state.index)
        self.reencoder = Reencoder(self.state, self.monitor, settled_version=resume.settled_version if resume else 0)
        self.handler = IndexerHandler(settings, self.state, self.reencoder, version_metrics, resume,
                                      snapshot_loaded=loaded is not None, deadletters=self.deadletters)
        self.api: RecallApi | None = None
        self.service = RecallService(self.state, self.config, self.monitor, self.health, shard=self.shard)
        self.serving_monitor = ServingMonitor(self.service, self.service.sampler, self.config.overlap_interval_s,
                                              self.config.overlap_max_items)
        if start.kind == "committed":
            self._prepare_resume(resume)

    # ---------------------------------------------------------------- shards
    def owns(self, topic: str, partition: int) -> bool:
        """Whether this indexer reads ``topic[partition]``: every partition, but on shard I of N only
        the ``items`` partitions p with p % N == I (items are keyed, so partitioned, by item id)."""
        if self.shard is None or topic != self.settings.topics.items:
            return True
        return partition % self.shard[1] == self.shard[0]

    def _check_shard_partitions(self) -> None:
        """Refuse to start a shard of an index split in more shards than ``items`` has partitions."""
        assert self.shard is not None
        consumer = make_consumer(self.settings, None, client_id="streamrecall-indexer-shard-check")
        try:
            partitions = consumer.partitions_for_topic(self.settings.topics.items) or set()
        finally:
            consumer.close(autocommit=False)
        shard, shards = self.shard
        if len(partitions) < shards:
            raise ConfigError(f"shards: the index is split in {shards} shards but topic {self.settings.topics.items} "
                              f"has {len(partitions)} partition(s); each shard needs at least one (shard I takes "
                              f"the partitions p with p % {shards} == I): add partitions or use fewer shards")
        log.info("indexer: shard %d of %d: items partitions %s", shard, shards,
                 sorted(p for p in partitions if p % shards == shard))

    # ---------------------------------------------------------------- restart
    def _prepare_resume(self, resume: indexer_snapshot.Resume | None) -> None:
        """Explicit start offsets for every partition, and the replay of model updates."""
        consumer = make_consumer(self.settings, None, client_id="streamrecall-indexer-restore")
        try:
            items = self.settings.topics.items
            start_at = Offsets({(logical, p): 0 for physical, (logical, _) in self.topics().items()
                                for p in consumer.partitions_for_topic(physical) or () if self.owns(physical, p)})
            if resume is not None:  # a shard's snapshot holds only its partitions; filtered all the same
                start_at.update(Offsets({(t, p): o for (t, p), o in resume.next_offsets().items()
                                         if t != "items" or self.owns(items, p)}))
                if resume.last_full_offset is not None:
                    self._replay_updates(consumer, resume)
                self._reconcile()
            self.handler.start_at = start_at
        finally:
            consumer.close(autocommit=False)

    def _replay_updates(self, consumer: KafkaConsumer, resume: indexer_snapshot.Resume) -> None:
        tp = TopicPartition(self.settings.topics.model_updates, resume.last_full_partition or 0)
        stop = resume.next_offsets().get("model-updates", tp.partition) or 0
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
        limit, ahead = self.settings.max_value_bytes, self.settings.max_event_ahead_ms
        topics: dict[str, tuple[str, Callable[[bytes | None], Any]]] = {
            t.items: ("items", Decoder(Item, limit, ahead).decode), t.model_updates: ("model-updates", ChunkReader())}
        if self.shard is None:  # a shard holds no user vectors: the router does
            topics[t.user_vectors] = ("user-vectors", user_vector_decoder(limit, ahead))
        return topics

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
        self.handler.updates.close()  # a full update still staging is re-read after a restart
        try:
            path = self.handler.snapshot()
            log.info("indexer: final snapshot %s: %d items in %.1fs", path.name, len(self.state.index),
                     self.handler.last_snapshot_s)
        except Exception:
            log.exception("indexer: final snapshot failed; the previous one stays current")

    def health(self) -> tuple[bool, dict[str, Any]]:
        state = self.state
        lag = self.handler.lag()
        total, reasons = lag_reasons(lag, self.config.ready_max_lag)
        # Settled: this replica has read every model update there is and its re-encode is done, so
        # its graph holds the current model's vectors (answers are version-consistent regardless).
        staleness = state.staleness()
        settled = lag is not None and lag.get("model-updates", 0) == 0 and self.reencoder.idle \
            and staleness["over_drift_bound"] == 0
        body = {"ready": not reasons, "reasons": reasons, "settled": settled, "items": len(state.index),
                "model_version": state.replica.version, "served_epoch": state.served_epoch,
                "stale_share": state.index.stale_share(state.current_epoch), **staleness,
                "model_trained_through_ms": state.replica.trained_through_ms,
                "settled_version": self.reencoder.settled_version, "reencode_pending": self.reencoder.pending,
                "rebuilding": self.reencoder.rebuilding,
                "user_vectors": len(state.users), "lag": total, "lag_by_topic": lag,
                "snapshot_loaded": self.handler.snapshot_loaded}
        if self.shard is not None:
            body["shard"] = {"index": self.shard[0], "of": self.shard[1]}
        return not reasons, body


def run(settings: Settings, start: StartPosition) -> None:
    """Run the indexer until SIGTERM/SIGINT; exit writes a final snapshot."""
    with ExitStack() as stack:
        process = RoleAssembly(ROLE, settings, stack)
        role = IndexerRole(process, start)
        stack.callback(role.close)  # after the runtime's final flush and the API's shutdown
        role.begin()
        process.run(start, role.handler, role.topics(), assign_all=True, serve_http=role.serve_http,
                    partitions=role.owns if role.shard else None)
