"""The model-update stream as Kafka sees it: chunks, the one assembler, finding where to start.

Every update the trainer writes to ``model-updates`` (one partition, so one order) is a sequence
of chunk records (``consumers/update_chunks.py``: no record above 1 MiB; a small update is one
record), whose headers let a reader find its way without decoding payloads:

- ``streamrecall.model.kind``: ``full`` or ``delta``
- ``streamrecall.model.version``: the update's version, decimal
- ``streamrecall.model.epoch``: the writing trainer process's fencing epoch, decimal
- ``streamrecall.model.chunk`` / ``streamrecall.model.size``: ``INDEX/COUNT`` and the payload's bytes
- ``streamrecall.model.signature``: with ``model_signing_key`` set, on the last chunk (the commit),
  the hex HMAC-SHA256 of the whole assembled payload (which holds kind, version and epoch in its
  JSON header). Replicas with the key refuse an update without it (``unsigned``) or with a wrong
  one (``bad-signature``), and the start-up scans below count only updates whose signature
  verifies (docs/security.md).

:class:`ModelUpdateStream` is the one path from records to applied updates, used by every
reader (the publisher's :class:`ModelUpdateFeed`, the indexer's poll loop and its replay): it
assembles chunks (bounded by ``max_bytes``), decodes the whole payload once, applies it, and
dead-letters a broken sequence or refused update once, at the offset of its first record.

A big full update is decoded and staged off the reader's loop: at a million rows it is ~200 MB,
and decoding and applying it in the loop stalled the publisher's fresh clicks and the indexer's
ingest for 1.2–4.3 s once per full update. Given ``prepare`` (``TowerReplica.prepare``), the
stream hands a full update of at least ``STAGE_MIN_BYTES`` to one worker thread that decodes it
and stages it against the replica (reading only); the records behind it are held, in order and
in bounded memory, and :meth:`ModelUpdateStream.pump` (each tick of the reader's loop) applies the
staged update — writing only the rows that move — then goes on with them. The replica serves its
previous version, whole, until then: a version is applied atomically or not at all.

A fresh reader starts at the **last full update** (the first record of the newest complete one,
found by scanning the topic backwards in windows and assembling what it reads) and applies
everything after it in order: a full update resets a replica, deltas chain on it by
``base_version``. Records before that full update are superseded and not decoded. Duplicates
(version ≤ the replica's) are skipped; a delta that does not chain (a gap) is skipped until the
next full update heals it; a payload that is malformed, unsafe or made for another model is
dead-lettered, and reading goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from kafka import KafkaConsumer

from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.handler import decode_value
from streamrecall.consumers.table import TopicReader

# The header names are re-exported here: this module is where readers and writers find them.
from streamrecall.consumers.update_chunks import Broken, Chunk, ChunkAssembler, ChunkReader, Complete
from streamrecall.consumers.update_codec import ModelUpdateDecoder
from streamrecall.consumers.update_scan import last_full_offset
from streamrecall.errors import StreamrecallError
from streamrecall.metrics import MODEL_VERSION, ModelVersionMetrics
from streamrecall.model import Applied, ModelUpdate, TowerReplica
from streamrecall.settings import Secret

log = logging.getLogger(__name__)


#: Records read per tick() by a side reader: at most this many MiB copied, and the few updates
#: they complete decoded (decoding a big one takes tens of ms or more).
RECORDS_PER_TICK = 16
#: Decoding and applying an update that takes at least this long is logged with its time.
SLOW_APPLY_S = 0.1
#: A full update at least this big is decoded and staged off the reader's loop (given ``prepare``):
#: ~16,000 rows at dim 64. Smaller ones are not worth a hand-off: the 50,000-item bench's 16.9 MB
#: full update decoded and applied in 0.022 s (docs/benchmarks.md).
STAGE_MIN_BYTES = 4 * 1024 * 1024


@dataclass
class _Staging:
    """A full update being decoded and staged by the worker; the records read behind it wait."""

    done: Complete
    key: bytes | None
    future: Future[ModelUpdate]
    started: float


class ModelUpdateStream:
    """Records of model-updates in, applied updates out: the one path every reader takes.

    :meth:`add` takes each record's :class:`Chunk` (read by :class:`ChunkReader`) in offset order;
    a record at an offset already read is ignored (a retried batch). A complete sequence is
    decoded once (signature, then payload) and handed to ``apply(update, first_offset)``; a broken
    sequence, an undecodable payload and an update ``apply`` refuses (a
    :class:`StreamrecallError`: another model, a stale epoch, a version jump) each become one
    :class:`DeadLetter` at the offset of the sequence's first record, given to ``deadletter``.
    :meth:`resume_offset` is the next offset to read that loses nothing (see
    :meth:`ChunkAssembler.resume_offset`)."""

    def __init__(self, topic: str, apply: Callable[[ModelUpdate, int], None],
                 deadletter: Callable[[DeadLetter], None], *, max_bytes: int,
                 signing_key: Secret | None = None, partition: int = 0,
                 prepare: Callable[[ModelUpdate], None] | None = None, stage_min_bytes: int = STAGE_MIN_BYTES,
                 role: str | None = None, metrics: ModelVersionMetrics = MODEL_VERSION) -> None:
        self.topic = topic
        self.partition = partition
        self.apply = apply
        self.deadletter = deadletter
        self.decode = ModelUpdateDecoder(signing_key, max_bytes)
        self.assembler = ChunkAssembler(max_bytes)
        self.prepare = prepare
        self.stage_min_bytes = stage_min_bytes
        self.role = role  # labels the apply-time histogram (None: not recorded)
        self.metrics = metrics
        self._next: int | None = None  # next offset not yet read
        self._staging: _Staging | None = None
        self._held: deque[tuple[int, Chunk, bytes | None]] = deque()  # read behind the staging update
        self._held_bytes = 0
        self._worker: ThreadPoolExecutor | None = None

    def add(self, offset: int, chunk: Chunk, key: bytes | None = None) -> None:
        if self._next is not None and offset < self._next:
            return
        self._next = offset + 1
        if self._staging is None:
            self._assemble(offset, chunk, key)
            return
        self._held.append((offset, chunk, key))
        self._held_bytes += len(chunk.value)
        if self._held_bytes > self.assembler.max_bytes:  # another whole update behind it: wait for the worker
            self.pump(wait=True)

    @property
    def staging(self) -> bool:
        """Whether a full update is being staged off the loop (the replica still serves the one before)."""
        return self._staging is not None

    def pump(self, *, wait: bool = False) -> None:
        """Apply the staged update if the worker is done with it (``wait``: wait for it, and for any
        staged behind it), then go on with the records held behind it. Cheap when nothing is staged."""
        while self._staging is not None and (wait or self._staging.future.done()):
            staging, self._staging = self._staging, None
            self._finish(staging)
            while self._held and self._staging is None:
                offset, chunk, key = self._held.popleft()
                self._held_bytes -= len(chunk.value)
                self._assemble(offset, chunk, key)

    def resume_offset(self, next_offset: int) -> int:
        if self._staging is not None:  # not applied yet, nor what is held behind it
            return self._staging.done.first
        return self.assembler.resume_offset(next_offset)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def _assemble(self, offset: int, chunk: Chunk, key: bytes | None) -> None:
        for outcome in self.assembler.add(offset, chunk):  # a Complete is always the last outcome
            if isinstance(outcome, Broken):
                self._refuse(outcome.first, key, outcome.value, outcome.reason, outcome.error)
            elif self.prepare is not None and outcome.kind == "full" and outcome.size >= self.stage_min_bytes:
                self._stage(outcome, key)
            else:
                self._complete(outcome, key)

    def _where(self, done: Complete) -> str:
        return f"{self.topic}[{self.partition}]@{done.first}"

    def _decoded(self, done: Complete) -> ModelUpdate:
        return decode_value(self.decode, done.payload, self._where(done), done.headers)

    def _stage(self, done: Complete, key: bytes | None) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-update-staging")
        prepare = self.prepare
        assert prepare is not None

        def work() -> ModelUpdate:
            update = self._decoded(done)
            prepare(update)
            return update

        self._staging = _Staging(done, key, self._worker.submit(work), time.perf_counter())

    def _finish(self, staging: _Staging) -> None:
        done = staging.done
        try:
            update = staging.future.result()  # a decode error (StreamrecallError) is raised here
            staged = time.perf_counter() - staging.started
            started = time.perf_counter()
            self.apply(update, done.first)
            took = time.perf_counter() - started
            self._observe("off_loop", staged)
            self._observe("loop", took)
            log.info("model update v%d at %s: %d bytes decoded and staged off the loop in %.2fs, applied in %.3fs",
                     update.version, self._where(done), done.size, staged, took)
        except StreamrecallError as exc:
            self._refuse_update(done, staging.key, exc)

    def _complete(self, done: Complete, key: bytes | None) -> None:
        started = time.perf_counter()
        try:
            update = self._decoded(done)
            self.apply(update, done.first)
            took = time.perf_counter() - started
            self._observe("loop", took)
            if took >= SLOW_APPLY_S:  # the reader's loop waited this long
                log.info("model update v%d at %s: %d bytes decoded and applied in %.2fs", update.version,
                         self._where(done), done.size, took)
        except StreamrecallError as exc:
            self._refuse_update(done, key, exc)

    def _observe(self, part: str, seconds: float) -> None:
        if self.role is not None:
            self.metrics.apply_seconds.labels(self.role, part).observe(seconds)

    def _refuse_update(self, done: Complete, key: bytes | None, exc: StreamrecallError) -> None:
        """Dead-letter a whole update that did not decode, verify or apply, at its first record."""
        self._refuse(done.first, key, done.payload, getattr(exc, "reason", "invalid"), f"{type(exc).__name__}: {exc}")

    def _refuse(self, offset: int, key: bytes | None, value: bytes, reason: str, error: str) -> None:
        self.deadletter(DeadLetter(self.topic, self.partition, offset, key, value, reason, error))


class ModelUpdateFeed:
    """Keeps a :class:`TowerReplica` current from the model-updates topic (a side reader).

    :meth:`start` catches up from the last full update before the role's loop starts; :meth:`poll`
    applies what arrived since, a few records per call, and returns the updates it applied (the
    publisher queues re-publication for them): the caller pulls, no callback is wired in. A big
    full update is staged off the loop and returned by the poll after the worker is done.
    """

    def __init__(self, consumer: KafkaConsumer, topic: str, replica: TowerReplica, deadletters: DeadLetterSink, *,
                 max_bytes: int, signing_key: Secret | None = None, role: str | None = None) -> None:
        partitions = consumer.partitions_for_topic(topic) or set()
        if len(partitions) > 1:
            raise StreamrecallError(f"{topic} has {len(partitions)} partitions; model updates need exactly one "
                                    "(their order is the version order)")
        self.consumer = consumer
        self.topic = topic
        self.replica = replica
        self._applied: list[tuple[ModelUpdate, Applied]] = []  # since the last poll
        self.signing_key = signing_key
        self.max_bytes = max_bytes
        self.stream = ModelUpdateStream(topic, self._apply, lambda letter: deadletters.send(letter, "model-updates"),
                                        max_bytes=max_bytes, signing_key=signing_key, prepare=replica.prepare,
                                        role=role)
        self.reader = TopicReader(consumer, topic, "model-updates", ChunkReader(),
                                  lambda r: self.stream.add(r.offset, r.value, r.key), deadletters, partitions=[0])
        self.counts = {"applied": 0, "duplicate": 0, "gap": 0}

    def start(self, timeout_s: float) -> bool:
        offset = last_full_offset(self.consumer, self.topic, self.signing_key, self.max_bytes)
        log.info("model updates: starting at %s[0]@%d (the last full update)", self.topic, offset)
        self.reader.start({0: offset})
        caught_up = self.reader.catch_up(timeout_s)
        self.stream.pump(wait=True)
        self._applied.clear()  # the replica is where the stream is: nothing to react to yet
        return caught_up

    def poll(self) -> list[tuple[ModelUpdate, Applied]]:
        """Apply what arrived since the last call (non-blocking: a big full update is staged off the
        loop and applied by a later call); the updates applied, in order."""
        self.stream.pump()
        self.reader.poll(timeout_ms=0, max_records=RECORDS_PER_TICK)
        applied, self._applied = self._applied, []
        return applied

    def _apply(self, update: ModelUpdate, offset: int) -> None:
        # ModelUpdateError (another model) and ModelUpdateRefused (stale epoch, version jump):
        # dead-lettered by the stream with their reason
        applied = self.replica.apply(update)
        self.counts[applied.status] += 1
        if applied.status == "gap":
            log.warning("model update v%d (delta on v%d) at %s[0]@%d does not chain onto v%d; "
                        "waiting for the next full update", update.version, update.base_version, self.topic,
                        offset, self.replica.version)
            return
        if applied.status == "duplicate":
            log.debug("model update v%d skipped: already at v%d", update.version, self.replica.version)
            return
        log.info("model update v%d (%s) applied", update.version, update.kind)
        self._applied.append((update, applied))

    def close(self) -> None:
        self.stream.close()
        self.reader.close()
