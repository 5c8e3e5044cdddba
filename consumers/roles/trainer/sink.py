"""Where the trainer's model updates go: chunked, signed and fenced records on ``model-updates``."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.consumers.update_chunks import DEFAULT_CHUNK_BYTES, split_update
from streamrecall.consumers.update_codec import sign_update
from streamrecall.metrics import role_metrics
from streamrecall.settings import Secret

log = logging.getLogger(__name__)


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
