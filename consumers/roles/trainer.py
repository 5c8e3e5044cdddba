"""The trainer role: clicks in, model updates out, checkpoints on disk (docs/roles.md).

- ``clicks`` (group subscription) are trained on in micro-batches of up to ``batch_size``;
  a partial batch is trained once its oldest click waited ``max_batch_wait_ms``.
- ``items`` is read whole by every trainer as a table (a side reader, from the beginning at
  start, then non-blocking polls in ``tick``); clicks on items not in it train on the id.
- A model update goes to ``model-updates`` at every runtime flush that follows training
  (every ``flush_interval_ms``, 200 ms by default), and every ``publish_every_steps`` steps
  while a backlog is trained. Each carries the sparse rows touched since the previous one and,
  at most every ``dense_every_s``, the dense layers; one every ``full_every_s`` is full, and so
  is the first one of each process (at start when a checkpoint was restored). Each travels in
  chunks of at most ``model_update_chunk_bytes`` (``consumers/update_chunks.py``: no record
  above 1 MiB; a small update is one record).
- **What a commit means.** ``flush`` trains what is buffered, publishes and waits for the
  broker's acknowledgement before the runtime commits the click offsets, so a committed click
  is one whose learning is on ``model-updates``: zero lag on the trainer's group means
  replicas can have everything the trainer knows. A failed publish (refused by the producer or
  not acknowledged) is logged and counted and blocks the commit (``TransientError``), but the
  trainer keeps consuming and training (the runtime retries the flush with back-off, without
  pausing), waits ``publish_backoff_s``, doubling up to ``publish_backoff_max_s``, before the
  next attempt, and makes that one full, which heals the chain. It never crash-loops.
- Model, estimator, optimiser state, trending, histories and the next click offsets to read
  are one checkpoint file, written atomically every ``checkpoint_every_s`` (from the
  runtime's ``flush``) and at shutdown. A restart resumes clicks from the checkpoint's
  offsets, not from the group's committed offsets (which may run ahead of it).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from streamrecall.consumers.app import deadletter_sink, model_config, run_handler
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.role_options import role_options
from streamrecall.consumers.runtime import HandlerBase, Record
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.table import ItemTable, TopicReader
from streamrecall.consumers.update_chunks import DEFAULT_CHUNK_BYTES, MAX_RECORD_BYTES, split_update
from streamrecall.consumers.updates import last_published, sign_update, update_max_bytes
from streamrecall.errors import ConfigError, TransientError
from streamrecall.events import Click, Decoder, Item
from streamrecall.metrics import MODEL_VERSION, STATE, ModelVersionMetrics, StateMetrics, TrainerMetrics, role_metrics
from streamrecall.model import ItemLike, OnlineTrainer, RecentHistory, ReplayBuffer
from streamrecall.model.catalog import DEFAULT_MAX_ITEMS
from streamrecall.model.safeio import read_layout
from streamrecall.settings import Secret, Settings

log = logging.getLogger(__name__)

ROLE = "trainer"
CHECKPOINT_FILE = "checkpoint.safetensors"
#: Layout version of the checkpoint's ``extra`` (offsets, histories, counters).
EXTRA_FORMAT = 1


@dataclass(frozen=True)
class TrainerOptions:
    """The ``[trainer]`` table of the settings file."""

    batch_size: int = 1024             # clicks per training step, at most
    max_batch_wait_ms: int = 200       # a partial batch is trained after its oldest click waited this long
    publish_every_steps: int = 20      # while a backlog is trained, publish after this many steps (and at every flush)
    dense_every_s: float = 0.0         # dense layers travel at most this often (0: in every update)
    full_every_s: float = 60.0         # a full update (dense layers + every trained row) at most this often
    checkpoint_every_s: float = 30.0   # checkpoint at the first flush this long after the last one
    history_users: int = 500_000       # users whose recent clicks are kept (LRU beyond)
    catalog_items: int = DEFAULT_MAX_ITEMS  # items of the items table kept (least recently upserted forgotten beyond)
    publish_backoff_s: float = 1.0     # after a failed publish, wait this long before the next attempt...
    publish_backoff_max_s: float = 60.0  # ...doubling with each failure in a row, up to this
    startup_timeout_s: float = 120.0   # bound on reading the items table at start
    replay_capacity: int = 0           # clicks kept to replay while the stream is idle (0: no replay; docs/model.md)
    replay_batch_size: int = 256       # clicks per replay step: one step per idle poll, so keep it small
    replay_half_life: float = 5_000.0  # a buffered click this many clicks old is drawn half as often

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainerOptions":
        return role_options(cls, settings, ROLE, may_be_zero=("dense_every_s", "replay_capacity"))


class UpdateSink(Protocol):
    """Where model updates go (Kafka in the role, a list in unit tests)."""

    def send(self, data: bytes, kind: str, version: int) -> None: ...

    def failed(self) -> bool:
        """True once if a send failed since the last call (the next update must then be full)."""

    def flush(self) -> None: ...


class KafkaUpdateSink:
    """Sends updates to the one-partition model-updates topic in chunks of at most ``chunk_bytes``
    (kind/version/epoch/chunk headers and, with a ``signing_key``, the HMAC of the whole payload on
    the last chunk; docs/security.md).

    A send the producer refuses at once (a record over its limit, no metadata or buffer space
    within ``max_block_ms``) is not raised: it counts as a failed update, like one the broker did
    not acknowledge, and :meth:`failed` reports it. An update counts as acknowledged when every
    chunk is; the "last acknowledged" gauges move only then (checked in :meth:`failed`, which the
    handler calls after every flush): an alert on them means updates are not *arriving*, not
    merely not being sent."""

    def __init__(self, producer: KafkaProducer, topic: str, trainer_epoch: int = 0,
                 signing_key: Secret | None = None, metrics: TrainerMetrics | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.producer = producer
        self.topic = topic
        self.trainer_epoch = trainer_epoch
        self.signing_key = signing_key
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics or role_metrics(TrainerMetrics)
        self._pending: dict[int, list[Any]] = {}  # version → its chunks' futures
        self._refused = 0  # updates the producer refused since the last failed()

    def send(self, data: bytes, kind: str, version: int) -> None:
        signature = sign_update(self.signing_key, data) if self.signing_key is not None else None
        chunks = split_update(data, kind, version, self.trainer_epoch, self.chunk_bytes, signature)
        futures = self._pending.setdefault(version, [])
        try:
            for value, headers in chunks:
                futures.append(self.producer.send(self.topic, value=value, partition=0, headers=headers))
        except KafkaError as exc:
            # The chunks already queued make an incomplete sequence: readers dead-letter it when
            # the next update (full) starts.
            del self._pending[version]
            self._refused += 1
            log.error("model update v%d (%d bytes, %d chunks) refused by the producer after %d chunk(s): %s: %s",
                      version, len(data), len(chunks), len(futures), type(exc).__name__, exc)
        else:
            self.metrics.update_chunks.observe(len(chunks))

    def failed(self) -> bool:
        bad, self._refused = self._refused, 0
        acked = []
        for version, futures in list(self._pending.items()):
            if not all(f.is_done for f in futures):
                continue
            del self._pending[version]
            errors = [f.exception for f in futures if f.failed()]
            if errors:
                bad += 1
                log.error("model update v%d was not acknowledged (%d of %d chunks failed): %s", version,
                          len(errors), len(futures), errors[0])
            else:
                acked.append(version)
        self.metrics.publish_failures.inc(bad)
        if acked:
            self.metrics.acked_version.set(max(acked))
            self.metrics.acked_time.set(time.time())
        return bool(bad)

    def flush(self) -> None:
        self.producer.flush(timeout=60)


class TrainerHandler(HandlerBase):
    """Trains on clicks, publishes updates, checkpoints. Kafka-free: the role wires the edges."""

    def __init__(self, trainer: OnlineTrainer, items: Mapping[str, ItemLike], sink: UpdateSink,
                 checkpoint_path: Path, clicks_topic: str, partitions: Sequence[int],
                 options: TrainerOptions = TrainerOptions(), metrics: TrainerMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION,
                 poll_items: Callable[[], Any] = lambda: None, side_flush: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, trainer_epoch: int = 0,
                 states: StateMetrics = STATE) -> None:
        self.trainer = trainer
        self.trainer_epoch = trainer_epoch  # this process's fencing epoch, in every update
        self.items = items
        self.sink = sink
        self.checkpoint_path = Path(checkpoint_path)
        self.clicks_topic = clicks_topic
        self.partitions = list(partitions)
        self.options = options
        self.metrics = metrics or role_metrics(TrainerMetrics)
        self.version_metrics = version_metrics
        self.poll_items = poll_items
        self.side_flush = side_flush
        self.clock = clock
        self.states = states
        self.history = RecentHistory(trainer.config.history_len, options.history_users)
        self.replay = ReplayBuffer(options.replay_capacity, options.replay_half_life, trainer.config.seed) \
            if options.replay_capacity else None
        self.offsets: dict[int, int] = {}   # next click offset to read, per partition, as of the last flush
        self.clicks_trained = 0             # clicks that went through a training step, over all restarts
        self.trained_through_ms = 0         # newest click event time trained on (travels in every update)
        self.restored = False
        self._buffer: list[Click] = []
        self._buffer_since = 0.0
        self._steps_since_publish = 0
        self._force_full = False
        self._failures_in_a_row = 0         # failed publishes since the last acknowledged one
        self._publish_after = float("-inf")  # no publish attempt before this (clock s): the back-off
        self._checkpointed: tuple[int, dict[int, int]] | None = None  # (clicks trained, offsets) last stored
        now = clock()
        self._last_full = now
        self._last_dense = now
        self._last_checkpoint = now

    # --- state ------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the checkpoint if there is one (CheckpointError if it is unreadable or incompatible:
        move it aside to start from scratch). Returns whether one was loaded."""
        if not self.checkpoint_path.exists():
            log.info("no checkpoint at %s: training from the seeded model, clicks from the beginning",
                     self.checkpoint_path)
            return False
        extra = self.trainer.restore(self.checkpoint_path)
        self.history = RecentHistory.from_json(extra["history"], self.options.history_users)
        if extra.get("clicks_topic") == self.clicks_topic:
            self.offsets = {int(p): int(o) for p, o in extra.get("offsets", {}).items()}
        else:
            log.warning("checkpoint was taken on topic %r, not %r: its offsets are ignored",
                        extra.get("clicks_topic"), self.clicks_topic)
        self.clicks_trained = int(extra.get("clicks_trained", 0))
        self.trained_through_ms = int(extra.get("trained_through_ms", 0))
        self.restored = True
        self._checkpointed = (self.clicks_trained, dict(self.offsets))
        log.info("restored %s: version %d, %d steps, %d clicks trained, next offsets %s", self.checkpoint_path,
                 self.trainer.version, self.trainer.steps, self.clicks_trained, self.offsets)
        return True

    def start_offsets(self) -> Mapping[TopicPartition, int]:
        """The checkpoint's next offsets; without a checkpoint every partition from the beginning
        (a fresh model learns from the whole retained stream)."""
        return {TopicPartition(self.clicks_topic, p): self.offsets.get(p, 0) for p in self.partitions}

    # --- the runtime's calls -------------------------------------------------------------
    def handle(self, records: list[Record]) -> None:
        for r in records:
            if not self._buffer:
                self._buffer_since = self.clock()
            self._buffer.append(r.value)
        size = self.options.batch_size
        while len(self._buffer) >= size:
            batch, self._buffer = self._buffer[:size], self._buffer[size:]
            self._train(batch)
            self._buffer_since = self.clock()
            self._maybe_publish()

    def tick(self) -> None:
        self.poll_items()
        if self._buffer and self.clock() - self._buffer_since >= self.options.max_batch_wait_ms / 1000:
            self._train_buffer()
        elif self.replay is not None and not self._buffer and len(self.replay):
            # Idle: no fresh click is waiting, so one small replay step cannot delay one.
            if self.trainer.replay_step(self.replay, self.items, self.options.replay_batch_size)["examples"]:
                self.metrics.replay_steps.inc()
                self._steps_since_publish += 1
        self._maybe_publish()

    def flush(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Train what is buffered, publish it and wait for the acknowledgement (so the commit that
        follows covers only published learning); checkpoint when due, so the offsets stored are
        exactly those of the clicks the stored model was trained on."""
        self.offsets.update({tp.partition: o for tp, o in offsets.items() if tp.topic == self.clicks_topic})
        self.side_flush()
        self._train_buffer()
        if (self._steps_since_publish or self._force_full) and self._may_publish():
            self.publish()
        self.sink.flush()  # waits for every acknowledgement
        if not self._check_sink() and self._failures_in_a_row and not (self._steps_since_publish or self._force_full):
            log.info("model updates are acknowledged again after %d failed publish(es)", self._failures_in_a_row)
            self._failures_in_a_row = 0
        if self.clock() - self._last_checkpoint >= self.options.checkpoint_every_s:
            if self._buffer or self._checkpointed != (self.clicks_trained, self.offsets):
                self.checkpoint()
            else:  # nothing new: the last checkpoint still holds
                self._last_checkpoint = self.clock()
        self._fill()
        if self._steps_since_publish or self._force_full:
            raise TransientError(f"learning is not on model-updates yet ({self._failures_in_a_row} failed "
                                 "publish(es) in a row): the click offsets it covers stay uncommitted; the next "
                                 f"update, full, goes out in {max(0.0, self._publish_after - self.clock()):.1f}s")

    def shutdown(self) -> None:
        """At exit: train the rest, publish what is unpublished, checkpoint."""
        self._train_buffer()
        if self._steps_since_publish:
            self.publish()
        self.sink.flush()
        self.checkpoint()

    # --- work -------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Export how full the bounded states are (at every flush: a few len() calls)."""
        s, trending = self.states, self.trainer.trending
        s.fill(ROLE, "histories", len(self.history), self.history.max_users)
        s.fill(ROLE, "catalog", len(self.items), getattr(self.items, "capacity", len(self.items)))
        s.fill(ROLE, "trending", len(trending), trending.capacity)

    def _train_buffer(self) -> None:
        size = self.options.batch_size
        while self._buffer:
            batch, self._buffer = self._buffer[:size], self._buffer[size:]
            self._train(batch)

    def _train(self, clicks: list[Click]) -> None:
        started = time.perf_counter()
        histories = self.history.before_each(clicks)
        batch = self.trainer.make_batch(clicks, self.items, histories)
        result = self.trainer.step(batch)
        if self.replay is not None:
            self.replay.add(clicks, histories)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.clicks_trained += len(clicks)
        self.trained_through_ms = max(self.trained_through_ms, max(c.ts for c in clicks))
        self._steps_since_publish += 1
        m = self.metrics
        m.steps.inc()
        m.examples.inc(result["examples"])
        m.unknown_items.inc(result["unknown_items"])
        m.loss.set(result["loss"])
        p = self.trainer.estimator.probability(batch.items.keys)
        m.estimator_top_p.set(float(p.max()))
        m.estimator_median_p.set(float(p.median()))

    def _maybe_publish(self) -> None:
        self._check_sink()
        if self._steps_since_publish >= self.options.publish_every_steps and self._may_publish():
            self.publish()

    def _may_publish(self) -> bool:
        return self.clock() >= self._publish_after

    def _check_sink(self) -> bool:
        """Whether a send failed since the last check. After a failure: back off (doubling, bounded)
        and make the next update full, which resets every replica whatever of the chain it missed."""
        failed = self.sink.failed()
        if failed:
            self._force_full = True
            self._failures_in_a_row += 1
            delay = min(self.options.publish_backoff_max_s,
                        self.options.publish_backoff_s * 2 ** min(self._failures_in_a_row - 1, 30))
            self._publish_after = self.clock() + delay
            log.error("model update publish failed (%d in a row): training goes on, clicks stay uncommitted; "
                      "next attempt (a full update) in %.1fs", self._failures_in_a_row, delay)
        return failed

    def publish(self) -> int:
        """Export and send the next model update; returns its version."""
        now = self.clock()
        full = self._force_full or now - self._last_full >= self.options.full_every_s
        dense = now - self._last_dense >= self.options.dense_every_s
        data = self.trainer.export_update(full=full, dense=dense, trained_through_ms=self.trained_through_ms,
                                          trainer_epoch=self.trainer_epoch)
        kind = _kind_of(data)  # the trainer may decide full itself (first export after start/restore)
        self.sink.send(data, kind, self.trainer.version)
        if kind == "full":
            self._last_full = now
        if kind == "full" or dense:
            self._last_dense = now
        self._force_full = False
        self._steps_since_publish = 0
        self.metrics.updates_published.labels(kind).inc()
        self.metrics.update_bytes.observe(len(data))
        self.version_metrics.version.labels(ROLE).set(self.trainer.version)
        log.debug("published model update v%d (%s, %d bytes)", self.trainer.version, kind, len(data))
        return self.trainer.version

    def checkpoint(self) -> None:
        """Write model + estimator + trending + histories + next offsets as one file, atomically."""
        self._train_buffer()
        extra = {"format": EXTRA_FORMAT, "clicks_topic": self.clicks_topic,
                 "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                 "clicks_trained": self.clicks_trained, "trained_through_ms": self.trained_through_ms,
                 "history": self.history.to_json()}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self.trainer.checkpoint(self.checkpoint_path, extra)
        self._last_checkpoint = self.clock()
        self._checkpointed = (self.clicks_trained, dict(self.offsets))
        self.metrics.checkpoint_time.set(time.time())
        log.info("checkpoint: version %d, %d steps, next offsets %s", self.trainer.version, self.trainer.steps,
                 extra["offsets"])


def _kind_of(data: bytes) -> str:
    """The kind named in an update's JSON header (read without materialising tensors)."""
    _, header = read_layout(data)
    return str(header.get("kind", "delta"))


def run(settings: Settings, start: StartPosition) -> None:
    """Run the trainer until SIGTERM/SIGINT, then train the rest, publish and checkpoint."""
    options = TrainerOptions.from_settings(settings)
    trainer = OnlineTrainer(model_config(settings))
    topics = settings.topics
    with ExitStack() as stack:
        side_producer = make_producer(settings)
        stack.callback(side_producer.close, 10)
        side_deadletters = deadletter_sink(settings, ROLE, side_producer)
        # Chunks are at most 1 MiB records; a send waits at most 15 s for metadata or buffer space
        # (then the update counts as failed: the trainer backs off and keeps training).
        update_producer = make_producer(settings, max_request_size=MAX_RECORD_BYTES, linger_ms=0,
                                        max_block_ms=15_000)
        stack.callback(update_producer.close, 30)

        table = ItemTable(options.catalog_items)
        items = TopicReader(make_consumer(settings, None), topics.items, "items",
                            Decoder(Item, settings.max_value_bytes).decode, table.apply, side_deadletters)
        stack.callback(items.close)
        clicks_partitions = sorted(items.consumer.partitions_for_topic(topics.clicks) or ())
        if not clicks_partitions:
            raise ConfigError(f"topic {topics.clicks} does not exist; run `streamrecall topics create`")

        # The fencing epoch: one past the highest on the topic (verified records only, with a key), so
        # replicas refuse a trainer this one replaces if it keeps publishing (docs/security.md).
        scan = make_consumer(settings, None)
        published = last_published(scan, topics.model_updates, settings.model_signing_key,
                                   update_max_bytes(settings, trainer.config))
        scan.close(autocommit=False)
        epoch = published.trainer_epoch + 1
        sink = KafkaUpdateSink(update_producer, topics.model_updates, epoch, settings.model_signing_key,
                               chunk_bytes=settings.model_update_chunk_bytes)
        handler = TrainerHandler(trainer, table.catalog, sink,
                                 settings.role_state_dir(ROLE) / CHECKPOINT_FILE, topics.clicks, clicks_partitions,
                                 options, role_metrics(TrainerMetrics), poll_items=items.poll,
                                 side_flush=lambda: side_deadletters.flush(30), trainer_epoch=epoch)
        handler.restore()
        if published.version > trainer.version:
            log.info("model-updates already holds v%d; the next update goes past it", published.version)
        trainer.advance_version(published.version)
        log.info("trainer epoch %d (model updates %s)", epoch,
                 "signed" if settings.model_signing_key is not None else "unsigned: no model_signing_key")

        items.start()
        items.catch_up(options.startup_timeout_s)
        log.info("items table: %d items", len(table.catalog))
        if handler.restored:  # consumers may hold deltas past the checkpoint: reset them now
            handler.publish()
        try:
            # A failing flush (a publish not acknowledged) does not pause the clicks: training goes on
            # while the commit waits for the next acknowledged (full) update.
            run_handler(ROLE, settings, start, handler,
                        {topics.clicks: ("clicks", Decoder(Click, settings.max_value_bytes).decode)}, stack=stack,
                        pause_on_flush_failure=False)
        finally:
            handler.shutdown()
