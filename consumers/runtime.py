"""The one poll loop every role uses: poll → decode → handle → flush → commit.

At-least-once: offsets are committed only after the handler's ``flush`` made the
side effects they cover durable (and the dead letters they produced are on the
broker). Handlers must therefore be idempotent (upsert by id, latest vector per
user). Every wait is bounded well below ``max_poll_interval_ms``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Mapping

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from streamrecall.consumers.catchup import CatchUpLog
from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.handler import Decode, Handler, Record, decode_value
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.start import StartPosition
from streamrecall.errors import StreamrecallError, TransientError
from streamrecall.gc_tuning import freeze_state
from streamrecall.metrics import RUNTIME, RuntimeMetrics

log = logging.getLogger(__name__)


MAX_BACKOFF_S = 5.0


FLUSH_TIMEOUT_S = 30.0


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying rather than dead-lettering: broker hiccups and a full or read-only disk."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False)) or "Timeout" in type(exc).__name__
    return isinstance(exc, OSError)


class Runtime:
    """Runs a :class:`Handler` over some topics until stopped.

    ``topics`` maps physical topic name → (logical name, decode function).
    ``assign_all`` assigns every partition of the topics to this process (no group
    rebalancing; used by roles whose every replica needs the whole stream, such as
    the indexer); offsets are still committed under ``group_id`` so lag shows up.
    ``partitions`` narrows that to the (physical topic, partition) pairs it accepts (a shard of
    the index takes its share of ``items``, a data-parallel trainer rank its share of
    ``clicks``). ``poll_timeout_ms`` bounds each poll (and so each loop iteration with nothing to
    read).

    A failing ``flush`` is retried with back-off (0.1 s doubling to 5 s) and nothing is
    committed until one succeeds. With ``pause_on_flush_failure`` (the default) consumption is
    paused meanwhile; without it the loop keeps polling and handling (the trainer goes on
    training while a model update waits to be acknowledged).
    """

    def __init__(self, *, role: str, consumer: KafkaConsumer, deadletters: DeadLetterSink,
                 handler: Handler, topics: Mapping[str, tuple[str, Decode]],
                 start: StartPosition = StartPosition(), assign_all: bool = False,
                 flush_interval_ms: int = 200, max_poll_records: int = 2000,
                 metrics: RuntimeMetrics = RUNTIME, heartbeat: Heartbeat | None = None,
                 pause_on_flush_failure: bool = True,
                 partitions: Callable[[str, int], bool] | None = None, poll_timeout_ms: int = 100) -> None:
        self.role = role
        self.consumer = consumer
        self.deadletters = deadletters
        self.handler = handler
        self.topics = dict(topics)
        self.start = start
        self.assign_all = assign_all
        self.partitions = partitions  # with assign_all: which (physical topic, partition) to take (None: all)
        self.flush_interval_s = flush_interval_ms / 1000.0
        self.max_poll_records = max_poll_records
        self.metrics = metrics
        self.pause_on_flush_failure = pause_on_flush_failure
        self.poll_timeout_ms = poll_timeout_ms
        self._stop = threading.Event()
        self._lock = threading.RLock()  # handle/flush vs. the rebalance listener on kafka's IO thread
        self._pending: dict[TopicPartition, int] = {}  # next offsets handled but not yet committed
        self._started: set[TopicPartition] = set()  # partitions whose start position was applied
        self._start_offsets: dict[TopicPartition, int] = {}
        # timestamp starts: skip records older than the start until the first one at/after it.
        # Some brokers (Tansu) answer a timestamp lookup with the base offset of the record batch.
        self._skip_before: dict[TopicPartition, int] = {}
        self._last_flush = time.monotonic()
        self._last_lag = 0.0
        self.catch_up = CatchUpLog(role)
        self._flush_failing_since: float | None = None
        self._backoff_s = 0.1
        self._retry_flush_at = 0.0  # without pausing: the next flush attempt after a failure (monotonic s)
        self.records_seen = 0
        self.heartbeat = heartbeat if heartbeat is not None else Heartbeat()  # /livez reads it
        deadletters.declare([logical for logical, _ in self.topics.values()])

    # --- lifecycle ------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop; it flushes and commits once more before returning."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only set the stop flag; the loop exits at its next step.
        Signals reach only the main thread: elsewhere (tests, embedding) call ``stop()``."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, max_records: int | None = None, max_seconds: float | None = None,
            until: Callable[[], bool] | None = None) -> None:
        """Poll until stopped (or a bound for tests and benchmarks is reached), then checkpoint."""
        deadline = time.monotonic() + max_seconds if max_seconds is not None else None
        with ExitStack() as stack:
            stack.callback(self._final_checkpoint)
            self._subscribe()
            while not self._stop.is_set():
                self.step()
                if max_records is not None and self.records_seen >= max_records:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                if until is not None and until():
                    break

    def step(self) -> None:
        """One iteration: poll, decode, handle, maybe flush and commit, then the handler's tick."""
        if self._flush_failing_since is not None and self.pause_on_flush_failure:
            self._retry_flush()
            self._beat()
            return
        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_poll_records)
        if polled:
            started = time.perf_counter()
            with self._lock:
                self._handle(self._decode(polled))
            self.metrics.batch_seconds.labels(self.role).observe(time.perf_counter() - started)
        self.handler.tick()
        if self._flush_due():
            self.flush_and_commit()
        self._update_lag()
        self._beat()

    def _flush_due(self) -> bool:
        if self._flush_failing_since is not None:  # not pausing: retry on the back-off's schedule
            return time.monotonic() >= self._retry_flush_at
        return time.monotonic() - self._last_flush >= self.flush_interval_s

    def _beat(self) -> None:
        """Record that a step completed (also while paused on a failing flush: retrying is progress)."""
        self.heartbeat.beat()
        self.metrics.last_step.labels(self.role).set(time.time())

    def caught_up(self) -> bool:
        """True when every assigned partition was read to its high watermark and committed."""
        assignment = self.consumer.assignment()
        if not assignment or self._pending:
            return False
        for tp in assignment:
            high = self.consumer.highwater(tp)
            if high is None or self.consumer.position(tp, timeout_ms=1000) < high:
                return False
        return True

    # --- steps ------------------------------------------------------------------
    def _subscribe(self) -> None:
        physical = list(self.topics)
        self._start_offsets = self._resolve_start(physical)
        if self.assign_all:
            partitions = {TopicPartition(t, p) for t in physical for p in (self.consumer.partitions_for_topic(t) or ())
                          if self.partitions is None or self.partitions(t, p)}
            if not partitions and self.partitions is not None:
                log.warning("%s: none of its partitions of %s exists: nothing to read", self.role, physical)
            elif not partitions:
                raise StreamrecallError(f"{self.role}: topics {physical} have no partitions; run `streamrecall topics create`")
            self.consumer.assign(sorted(partitions))
            self._on_assigned(partitions)
        else:
            self.consumer.subscribe(physical, listener=_Listener(self))

    def _resolve_start(self, physical: list[str]) -> dict[TopicPartition, int]:
        """Explicit offsets for each partition, computed before any assignment (listeners cannot block)."""
        own = {TopicPartition(self._physical(t), p): o for (t, p), o in self.handler.start_offsets().items()}
        if self.start.kind == "committed":
            return own
        if self.start.kind == "offsets":
            return {TopicPartition(t, p): o for (t, p), o in self.start.offsets.items()}
        if self.start.kind == "timestamp":
            partitions = [TopicPartition(t, p) for t in physical for p in (self.consumer.partitions_for_topic(t) or ())]
            found = self.consumer.offsets_for_times({tp: self.start.timestamp_ms for tp in partitions})
            # -1: nothing at or after the timestamp, so the partition starts at its end.
            resolved = {tp: (found[tp].offset if found.get(tp) is not None else -1) for tp in partitions}
            return resolved
        return {}

    def _on_assigned(self, partitions: set[TopicPartition]) -> None:
        with self._lock:
            self.metrics.rebalances.labels(self.role, "assigned").inc()
            fresh = partitions - self._started
            for tp in fresh:
                offset = self._start_offsets.get(tp)
                if self.start.kind == "earliest":
                    self.consumer.seek_to_beginning(tp)
                elif self.start.kind == "latest" or offset == -1:
                    self.consumer.seek_to_end(tp)
                elif offset is not None:
                    self.consumer.seek(tp, offset)
                if self.start.kind == "timestamp" and offset != -1:
                    self._skip_before[tp] = self.start.timestamp_ms or 0
            self._started |= fresh
            log.info("%s assigned %s", self.role, _fmt(partitions))
            self.handler.assigned(partitions)

    def _on_revoked(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Flush the handler and return the offsets to commit for the revoked partitions."""
        with self._lock:
            self.metrics.rebalances.labels(self.role, "revoked").inc()
            to_commit = {tp: o for tp, o in self._pending.items() if tp in partitions}
            if to_commit:
                try:
                    self.handler.flush(self._logical_offsets(self._pending))
                    self.deadletters.flush(FLUSH_TIMEOUT_S)
                except Exception:  # the new owner re-reads from the last commit: at-least-once holds
                    log.exception("%s: flush on revoke failed; %s will be re-read by the new owner",
                                  self.role, _fmt(partitions))
                    to_commit = {}
            for tp in partitions:
                self._pending.pop(tp, None)
            self.handler.revoked(partitions)
            log.info("%s revoked %s", self.role, _fmt(partitions))
            return to_commit

    def _decode(self, polled: Mapping[TopicPartition, list[Any]]) -> list[Record]:
        out: list[Record] = []
        for tp, messages in polled.items():
            logical, decode = self.topics[tp.topic]
            self.metrics.records_consumed.labels(self.role, logical).inc(len(messages))
            if tp in self._skip_before:
                messages = self._skip_early(tp, messages)
            for m in messages:
                try:
                    value = decode_value(decode, m.value, f"{tp.topic}[{tp.partition}]@{m.offset}", m.headers)
                except StreamrecallError as exc:
                    self._deadletter(tp, m, getattr(exc, "reason", "invalid"), str(exc))
                    continue
                out.append(Record(logical, tp.partition, m.offset, m.key, value, m.timestamp, m.value))
            self.records_seen += len(messages)
            if messages:
                self._pending[tp] = messages[-1].offset + 1
        return out

    def _skip_early(self, tp: TopicPartition, messages: list[Any]) -> list[Any]:
        start_ts = self._skip_before[tp]
        for i, m in enumerate(messages):
            if m.timestamp >= start_ts:
                del self._skip_before[tp]
                return messages[i:]
        self._pending[tp] = messages[-1].offset + 1
        return []

    def _handle(self, records: list[Record]) -> None:
        """Hand the batch over; on a non-transient error isolate and dead-letter the records that fail."""
        if not records:
            return
        with self._lock:
            try:
                self._with_retries(lambda: self.handler.handle(records))
                return
            except Exception as exc:
                if len(records) == 1:
                    self._deadletter_record(records[0], exc)
                    return
                log.warning("%s: batch of %d failed (%s); retrying record by record", self.role, len(records), exc)
            for record in records:
                try:
                    self._with_retries(lambda: self.handler.handle([record]))
                except Exception as exc:
                    self._deadletter_record(record, exc)

    def _with_retries(self, fn: Callable[[], None]) -> None:
        backoff = 0.1
        while True:
            try:
                fn()
                return
            except Exception as exc:
                if not is_transient(exc) or self._stop.is_set():
                    raise
                self.metrics.transient_retries.labels(self.role).inc()
                log.warning("%s: transient error, retrying in %.1fs: %s", self.role, backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _deadletter_record(self, record: Record, exc: BaseException) -> None:
        # A handler's refusal may name its reason (a model update from a stale epoch); anything else
        # is a handler error.
        letter = DeadLetter(self._physical(record.topic), record.partition, record.offset, record.key, record.raw,
                            getattr(exc, "reason", "handler-error"), f"{type(exc).__name__}: {exc}")
        self.deadletters.send(letter, record.topic)

    def _deadletter(self, tp: TopicPartition, m: Any, reason: str, error: str) -> None:
        letter = DeadLetter(tp.topic, tp.partition, m.offset, m.key, m.value, reason, error)
        self.deadletters.send(letter, self.topics[tp.topic][0])

    def _physical(self, logical: str) -> str:
        return next(t for t, (name, _) in self.topics.items() if name == logical)

    def _logical_offsets(self, offsets: Mapping[TopicPartition, int]) -> Offsets:
        return Offsets({(self.topics[tp.topic][0], tp.partition): o for tp, o in offsets.items()})

    # --- flush and commit -------------------------------------------------------
    def flush_and_commit(self) -> bool:
        """Flush side effects and dead letters, then commit. On failure pause consumption and retry."""
        self._last_flush = time.monotonic()
        started = time.perf_counter()
        with self._lock:
            offsets = dict(self._pending)
            try:
                covered = self.handler.flush(self._logical_offsets(offsets))
                self.deadletters.flush(FLUSH_TIMEOUT_S)
            except Exception as exc:
                self._enter_flush_failure(exc)
                return False
            if covered is not None:  # the handler's durable state trails what it was handed
                offsets = {TopicPartition(self._physical(t), p): o for (t, p), o in covered.items()}
        if self._flush_failing_since is not None and not self.pause_on_flush_failure:
            log.info("%s: flush recovered after %.1fs", self.role, time.monotonic() - self._flush_failing_since)
            self._flush_failing_since = None
        if offsets:
            self._commit(offsets)
        self.metrics.flush_seconds.labels(self.role).observe(time.perf_counter() - started)
        return True

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except CommitFailedError as exc:
            # Rebalanced away: the new owner re-reads from the last commit; our effects are idempotent.
            self.metrics.commits.labels(self.role, "failed").inc()
            log.warning("%s: commit failed after a rebalance: %s", self.role, exc)
            return
        except KafkaError as exc:
            self.metrics.commits.labels(self.role, "failed").inc()
            log.warning("%s: commit failed (%s); the next flush retries", self.role, exc)
            return
        self.metrics.commits.labels(self.role, "ok").inc()
        with self._lock:
            for tp, o in offsets.items():
                if self._pending.get(tp) == o:
                    del self._pending[tp]

    def _enter_flush_failure(self, exc: BaseException) -> None:
        if not self.pause_on_flush_failure:
            if self._flush_failing_since is None:
                self._flush_failing_since = time.monotonic()
                self._backoff_s = 0.1
                log.error("%s: flush failed; consuming on, committing nothing until a flush succeeds: %s: %s",
                          self.role, type(exc).__name__, exc)
            else:
                log.warning("%s: flush still failing after %.0fs: %s", self.role,
                            time.monotonic() - self._flush_failing_since, exc)
            self._retry_flush_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            return
        if self._flush_failing_since is None:
            self._flush_failing_since = time.monotonic()
            self._backoff_s = 0.1
            log.error("%s: flush failed, pausing consumption until it succeeds: %s: %s",
                      self.role, type(exc).__name__, exc)
            paused = self.consumer.assignment()
            if paused:
                self.consumer.pause(*paused)
        else:
            log.warning("%s: flush still failing after %.0fs: %s", self.role,
                        time.monotonic() - self._flush_failing_since, exc)

    def _retry_flush(self) -> None:
        self.consumer.poll(timeout_ms=0)  # keep the client serviced while paused
        time.sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        self._flush_failing_since, failing_since = None, self._flush_failing_since
        if self.flush_and_commit():
            self.consumer.resume(*self.consumer.paused())
            log.info("%s: flush recovered after %.1fs; consumption resumed", self.role,
                     time.monotonic() - (failing_since or 0))
        elif self._flush_failing_since is None:
            self._flush_failing_since = failing_since

    def _final_checkpoint(self) -> None:
        try:
            ok = self.flush_and_commit()
            if not ok:
                log.error("%s: final flush failed; uncommitted records will be re-read on restart", self.role)
        finally:
            self.consumer.close(autocommit=False)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        total = 0
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if position is not None:
                logical = self.topics[tp.topic][0]
                self.metrics.lag.labels(self.role, logical, str(tp.partition)).set(max(0, high - position))
                total += max(0, high - position)
        behind = self.catch_up.active
        self.catch_up.observe(total, now)
        if behind and not self.catch_up.active:  # caught up: what the backlog built is long-lived
            freeze_state()


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: it must not block on the consumer, so it awaits commit_async."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        offsets = self.runtime._on_revoked(set(revoked))
        if offsets:
            try:
                await self.runtime.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
                self.runtime.metrics.commits.labels(self.runtime.role, "ok").inc()
            except Exception as exc:  # the new owner re-reads: at-least-once holds
                self.runtime.metrics.commits.labels(self.runtime.role, "failed").inc()
                log.warning("%s: commit on revoke failed: %s", self.runtime.role, exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.runtime._on_assigned(set(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        with self.runtime._lock:
            for tp in lost:
                self.runtime._pending.pop(tp, None)
            self.runtime.handler.revoked(set(lost))


def _fmt(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "nothing"
