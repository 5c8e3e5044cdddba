"""The trainer's handler: clicks in, training steps, model updates and checkpoints out. Kafka-free."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.consumers.roles.trainer.options import ROLE, TrainerOptions, full_interval_s
from streamrecall.consumers.roles.trainer.sink import UpdateSink
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.errors import TransientError
from streamrecall.events import Click
from streamrecall.metrics import MODEL_VERSION, STATE, ModelVersionMetrics, StateMetrics, role_metrics
from streamrecall.model import ItemLike, OnlineTrainer, RecentHistory, ReplayBuffer
from streamrecall.model.safeio import read_layout

log = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.safetensors"


#: Layout version of the checkpoint's ``extra`` (offsets, histories, counters). 2: offsets in the
#: one stored form of :class:`Offsets` (1 held the clicks partitions' offsets alone; still read).
EXTRA_FORMAT = 2


class TrainerHandler(HandlerBase):
    """Trains on clicks, publishes updates, checkpoints. Kafka-free: the role wires the edges."""

    def __init__(self, trainer: OnlineTrainer, items: Mapping[str, ItemLike], sink: UpdateSink,
                 checkpoint_path: Path, clicks_topic: str, partitions: Sequence[int],
                 options: TrainerOptions = TrainerOptions(), metrics: TrainerMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION,
                 poll_items: Callable[[], Any] = lambda: None,
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
        self.clock = clock
        self.states = states
        self.history = RecentHistory(trainer.config.history_len, options.history_users)
        self.replay = ReplayBuffer(options.replay_capacity, options.replay_half_life, trainer.config.seed) \
            if options.replay_capacity else None
        self.offsets = Offsets()            # next click offset to read, per partition, as of the last flush
        self.clicks_trained = 0             # clicks that went through a training step, over all restarts
        self.trained_through_ms = 0         # newest click event time trained on (travels in every update)
        self.restored = False
        self._buffer: list[Click] = []
        self._buffer_since = 0.0
        self._steps_since_publish = 0
        self._force_full = False
        self._failures_in_a_row = 0         # failed publishes since the last acknowledged one
        self._publish_after = float("-inf")  # no publish attempt before this (clock s): the back-off
        self._checkpointed: tuple[int, Offsets] | None = None  # (clicks trained, offsets) last stored
        now = clock()
        self._last_full = now
        self._last_full_bytes = 0  # the last full update's size: a big model's are spaced out (full_bytes_per_s)
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
        self._restore_extra(self.trainer.restore(self.checkpoint_path))
        return True

    def _restore_extra(self, extra: Mapping[str, Any]) -> None:
        """The role's part of a restored checkpoint: histories, offsets, counters."""
        self.history = RecentHistory.from_json(extra["history"], self.options.history_users)
        if extra.get("clicks_topic") == self.clicks_topic:
            stored = extra.get("offsets", {})
            if extra.get("format", 1) < 2:  # the clicks partitions' offsets alone
                stored = {"clicks": stored}
            self.offsets = Offsets.from_json(stored, str(self.checkpoint_path)).only("clicks")
        else:
            log.warning("checkpoint was taken on topic %r, not %r: its offsets are ignored",
                        extra.get("clicks_topic"), self.clicks_topic)
        self.clicks_trained = int(extra.get("clicks_trained", 0))
        self.trained_through_ms = int(extra.get("trained_through_ms", 0))
        self.restored = True
        self._checkpointed = (self.clicks_trained, self.offsets.copy())
        log.info("restored %s: version %d, %d steps, %d clicks trained, next offsets %s", self.checkpoint_path,
                 self.trainer.version, self.trainer.steps, self.clicks_trained, self.offsets)

    def start_offsets(self) -> Offsets:
        """The checkpoint's next offsets; without a checkpoint every partition from the beginning
        (a fresh model learns from the whole retained stream)."""
        return Offsets({("clicks", p): self.offsets.get("clicks", p) or 0 for p in self.partitions})

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

    def flush(self, offsets: Offsets) -> None:
        """Train what is buffered, publish it and wait for the acknowledgement (so the commit that
        follows covers only published learning); checkpoint when due, so the offsets stored are
        exactly those of the clicks the stored model was trained on."""
        self.offsets.update(offsets.only("clicks"))
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
        full = self._force_full or now - self._last_full >= full_interval_s(self.options, self._last_full_bytes)
        dense = now - self._last_dense >= self.options.dense_every_s
        data = self.trainer.export_update(full=full, dense=dense, trained_through_ms=self.trained_through_ms,
                                          trainer_epoch=self.trainer_epoch)
        kind = _kind_of(data)  # the trainer may decide full itself (first export after start/restore)
        self.sink.send(data, kind, self.trainer.version)
        if kind == "full":
            self._last_full, self._last_full_bytes = now, len(data)
            self.metrics.full_interval.set(full_interval_s(self.options, len(data)))
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
                 "offsets": self.offsets.to_json(),
                 "clicks_trained": self.clicks_trained, "trained_through_ms": self.trained_through_ms,
                 "history": self.history.to_json()}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self.trainer.checkpoint(self.checkpoint_path, extra)
        self._last_checkpoint = self.clock()
        self._checkpointed = (self.clicks_trained, self.offsets.copy())
        self.metrics.checkpoint_time.set(time.time())
        log.info("checkpoint: version %d, %d steps, next offsets %s", self.trainer.version, self.trainer.steps,
                 extra["offsets"])


def _kind_of(data: bytes) -> str:
    """The kind named in an update's JSON header (read without materialising tensors)."""
    _, header = read_layout(data)
    return str(header.get("kind", "delta"))
