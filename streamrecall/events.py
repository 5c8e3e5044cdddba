"""The event contract: typed, validated decoding of topic values (docs/events.md).

Unknown fields are ignored. Missing required fields, wrong types, non-finite
numbers, oversized and undecodable values, and timestamps too far ahead of the
reader's clock raise :class:`InvalidEvent`, whose ``reason`` is a short fixed label
(it becomes a metric label and a dead-letter header) and whose message says what
was wrong.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Callable, Generic, Iterable, TypeVar

import msgspec

from streamrecall.errors import StreamrecallError

#: Values larger than this are refused before decoding (the dead-letter reason is "oversized").
DEFAULT_MAX_VALUE_BYTES = 1 << 20
#: Event times later than the reader's clock plus this are refused ("future"). State keeps the
#: latest event time it saw (the newest items, a user's newest click), so one event stamped in
#: the year 3000 would otherwise pin its item or user (docs/events.md). One hour, as Kafka 4's
#: broker default for record timestamps (log.message.timestamp.after.max.ms).
DEFAULT_MAX_AHEAD_MS = 3_600_000
#: 9999-12-31T23:59:59.999Z: the last millisecond a timestamp may name. It keeps every time in
#: the int64 columns of the index and its snapshots.
MAX_MILLIS = 253_402_300_799_999

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=MAX_MILLIS)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Token = Annotated[str, msgspec.Meta(max_length=256)]


class InvalidEvent(StreamrecallError):
    """A value that breaks the event contract. ``reason`` is one of REASONS."""

    REASONS = ("undecodable", "invalid", "oversized", "null", "future")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _require_finite(name: str, *values: float) -> None:
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")


class Item(msgspec.Struct, frozen=True, kw_only=True):
    """A catalog item. A later event for the same id updates it; ``deleted`` removes it.
    ``updated_at`` (optional) is when this change was made; freshness is measured from it."""

    item_id: Id
    created_at: Millis
    updated_at: Millis | None = None
    title: Text | None = None
    categories: Annotated[tuple[Token, ...], msgspec.Meta(max_length=64)] = ()
    tags: Annotated[tuple[Token, ...], msgspec.Meta(max_length=256)] = ()
    features: Annotated[dict[Token, float], msgspec.Meta(max_length=256)] = {}
    deleted: bool = False

    def __post_init__(self) -> None:
        _require_finite("features", *self.features.values())


def event_time(item: Item) -> int:
    """When the change an item event carries happened: ``updated_at``, else ``created_at`` (ms)."""
    return item.updated_at if item.updated_at is not None else item.created_at


class Click(msgspec.Struct, frozen=True, kw_only=True):
    """A user clicked an item at ``ts`` (ms). ``weight`` scales its training signal."""

    user_id: Id
    item_id: Id
    ts: Millis
    weight: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 1.0

    def __post_init__(self) -> None:
        _require_finite("weight", self.weight)


class UserVector(msgspec.Struct, frozen=True, kw_only=True):
    """A user's refreshed embedding, published to the compacted user-vectors topic."""

    user_id: Id
    vector: Annotated[list[float], msgspec.Meta(min_length=1, max_length=4096)]
    model_version: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    event_ts: Millis
    published_at: Millis
    recent_items: Annotated[list[Id], msgspec.Meta(max_length=1024)] = []

    def __post_init__(self) -> None:
        _require_finite("vector", *self.vector)


E = TypeVar("E", Item, Click, UserVector)


def _event_times(event: Item | Click | UserVector) -> Iterable[tuple[str, int | None]]:
    if isinstance(event, Click):
        return (("ts", event.ts),)
    if isinstance(event, Item):
        return ("created_at", event.created_at), ("updated_at", event.updated_at)
    return ("event_ts", event.event_ts), ("published_at", event.published_at)


class Decoder(Generic[E]):
    """Decodes one event type from bytes, refusing anything off-contract.

    ``max_ahead_ms``: how far past ``clock()`` (ms) an event time may be; a later one is refused
    as "future". The check is against the clock when the record is read, so a record refused
    today would be accepted by a replay once its time has come."""

    def __init__(self, event_type: type[E], max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
                 max_ahead_ms: int = DEFAULT_MAX_AHEAD_MS,
                 clock: Callable[[], float] = time.time) -> None:
        self.event_type = event_type
        self.max_value_bytes = max_value_bytes
        self.max_ahead_ms = max_ahead_ms
        self.clock = clock
        self._decoder = msgspec.json.Decoder(event_type)

    def decode(self, value: bytes | None) -> E:
        """The event in ``value``; any other input raises :class:`InvalidEvent` (never another error)."""
        if value is None:
            raise InvalidEvent("null", "value is null (tombstone); expected a JSON object")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidEvent("undecodable", f"value must be bytes, got {type(value).__name__}")
        if len(value) > self.max_value_bytes:
            raise InvalidEvent("oversized", f"value is {len(value)} bytes; the limit is {self.max_value_bytes}")
        try:
            event = self._decoder.decode(value)
        except msgspec.ValidationError as exc:
            # Times in µs or ns since the epoch (a common unit mistake) land past MAX_MILLIS: say so.
            unit = "; times are milliseconds since the epoch (is this one in µs or ns?)" \
                if f"<= {MAX_MILLIS}" in str(exc) else ""
            raise InvalidEvent("invalid", f"{self.event_type.__name__}: {exc}{unit}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidEvent("undecodable", f"not JSON: {exc}") from None
        except RecursionError:  # msgspec recurses on nesting inside some fields (a dict of ...)
            raise InvalidEvent("undecodable", "JSON nested too deeply") from None
        self._check_times(event)
        return event

    def _check_times(self, event: E) -> None:
        now = int(self.clock() * 1000)
        for name, ms in _event_times(event):
            if ms is not None and ms - now > self.max_ahead_ms:
                raise InvalidEvent("future", f"{self.event_type.__name__}: {name} {ms} is {(ms - now) / 1000:.0f}s "
                                             f"ahead of this reader's clock; the limit is {self.max_ahead_ms // 1000}s "
                                             "(max_event_ahead_ms)")


def user_vector_decoder(max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, max_ahead_ms: int = DEFAULT_MAX_AHEAD_MS,
                        ) -> Callable[[bytes | None], UserVector | None]:
    """The one decoder of the compacted ``user-vectors`` topic, for every reader of it: a
    tombstone (null value) decodes to None (the user is removed), anything else as a
    :class:`UserVector` or :class:`InvalidEvent`."""
    decoder = Decoder(UserVector, max_value_bytes, max_ahead_ms)

    def decode(value: bytes | None) -> UserVector | None:
        return None if value is None else decoder.decode(value)

    return decode


_encoder = msgspec.json.Encoder()


def encode(event: Item | Click | UserVector) -> bytes:
    """JSON-encode an event (omitting nothing; readers ignore unknown fields)."""
    return _encoder.encode(event)


def json_schema(event_type: type) -> dict:
    """The JSON Schema of one event, as shipped in schemas/."""
    return msgspec.json.schema(event_type)
