"""What a role gives the poll loop: a :class:`Handler` of decoded :class:`Record` batches.

A handler applies records in memory (``handle``), makes their effects durable when asked
(``flush``, given the :class:`~streamrecall.consumers.offsets.Offsets` the flush covers), says
where its durable state resumes (``start_offsets``), and does time-driven work in ``tick``. It
never touches Kafka: the runtime (``consumers/runtime.py``) polls, decodes with the topic's one
decoder (:func:`decode_value`), commits and dead-letters around it."""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from kafka import TopicPartition

from streamrecall.consumers.offsets import Offsets
from streamrecall.errors import StreamrecallError

log = logging.getLogger(__name__)


#: Decodes a topic's value bytes into an event; raises an error with a ``reason`` attribute
#: (``streamrecall.events.InvalidEvent``, ``ModelUpdateError``...) for values that break the contract.
#: A decoder with a true ``uses_headers`` attribute is called with the record's headers too
#: (the model-updates decoder checks a signature header).
Decode = Callable[..., Any]


class DecoderBug(StreamrecallError):
    """A topic's decoder let a foreign exception out (ValueError, RecursionError...). Decoders
    are meant to be total; this turns a bug in one into a dead letter instead of a dead role."""

    reason = "invalid"


def decode_value(decode: Decode, value: bytes | None, where: str,
                 headers: list[tuple[str, bytes | None]] | None = None) -> Any:
    """``decode(value)`` for the record at ``where`` (``topic[partition]@offset``), raising only
    :class:`StreamrecallError` (with a ``reason``): every reader of a topic decodes through here."""
    try:
        return decode(value, headers) if getattr(decode, "uses_headers", False) else decode(value)
    except StreamrecallError:
        raise
    except Exception as exc:  # the backstop: never let a decoder's bug stop the role
        log.error("decoder bug at %s: %s escaped the decoder; the record is dead-lettered as invalid",
                  where, type(exc).__name__, exc_info=True)
        raise DecoderBug(f"{type(exc).__name__}: {exc}"[:1000]) from None


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record. ``topic`` is the logical name ("items", "clicks", ...)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    timestamp_ms: int
    raw: bytes | None = field(repr=False, default=None)


class Handler(Protocol):
    """What a role gives the runtime. :class:`HandlerBase` supplies no-op defaults."""

    def handle(self, records: list[Record]) -> None:
        """Apply a batch in memory. Raise TransientError to have it retried."""

    def flush(self, offsets: Offsets) -> None:
        """Make the side effects of everything handled durable. ``offsets`` are the next offsets to
        read that this flush covers, by logical topic (roles that snapshot store them with their state)."""

    def start_offsets(self) -> Offsets:
        """Next offsets to read from the role's own durable state (snapshot/checkpoint), if any."""

    def assigned(self, partitions: set[TopicPartition]) -> None: ...

    def revoked(self, partitions: set[TopicPartition]) -> None: ...

    def tick(self) -> None:
        """Called once per loop iteration, for time-driven work (publishing, snapshots)."""


class HandlerBase(abc.ABC):
    """No-op defaults for everything but ``handle``."""

    @abc.abstractmethod
    def handle(self, records: list[Record]) -> None:
        """Apply a batch in memory (see :class:`Handler`)."""

    def flush(self, offsets: Offsets) -> None:
        pass

    def start_offsets(self) -> Offsets:
        return Offsets()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        pass

    def revoked(self, partitions: set[TopicPartition]) -> None:
        pass

    def tick(self) -> None:
        pass
