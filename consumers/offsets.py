"""Offsets: the next offset to read, by (logical topic, partition). One type for every role.

The runtime and a role speak only in this type: ``Handler.flush(offsets)`` gets the next offsets
that the flush covers (the ones the runtime is about to commit), and ``Handler.start_offsets()``
gives back the next offsets a role's durable state resumes from. Topics are *logical* names
("clicks", "items", "model-updates"): the runtime maps them to the physical topic names of the
settings. The trainer's checkpoint and the indexer's snapshot store them in one form,
:meth:`Offsets.to_json` (``{"clicks": {"0": 1200, "1": 980}}``), read back by
:meth:`Offsets.from_json`, which refuses anything else with a reason. A stored offset is always
the **next offset to read**, never the last one read: resuming at it loses nothing and reads
nothing twice that the state already covers.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from streamrecall.errors import StreamrecallError

Key = tuple[str, int]  # (logical topic, partition)


class OffsetsError(StreamrecallError):
    """Stored offsets that are not offsets (a state file edited by hand, or of another version)."""


class Offsets:
    """The next offset to read of each (logical topic, partition)."""

    __slots__ = ("_next",)

    def __init__(self, entries: Mapping[Key, int] | None = None) -> None:
        self._next: dict[Key, int] = {}
        for (topic, partition), offset in (entries or {}).items():
            self.set(topic, partition, offset)

    def set(self, topic: str, partition: int, offset: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise OffsetsError(f"{topic}[{partition}]: an offset must be a non-negative integer, got {offset!r}")
        self._next[(topic, int(partition))] = offset

    def get(self, topic: str, partition: int, default: int | None = None) -> int | None:
        return self._next.get((topic, partition), default)

    def of(self, topic: str) -> dict[int, int]:
        """``topic``'s next offsets by partition."""
        return {p: o for (t, p), o in self._next.items() if t == topic}

    def only(self, *topics: str) -> Offsets:
        """The offsets of ``topics`` alone."""
        return Offsets({k: o for k, o in self._next.items() if k[0] in topics})

    def update(self, other: Offsets) -> None:
        self._next.update(other._next)

    def copy(self) -> Offsets:
        return Offsets(self._next)

    def items(self) -> Iterator[tuple[Key, int]]:
        return iter(sorted(self._next.items()))

    def __len__(self) -> int:
        return len(self._next)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Offsets) and self._next == other._next

    def __repr__(self) -> str:
        return "Offsets(" + ", ".join(f"{t}[{p}]@{o}" for (t, p), o in self.items()) + ")"

    def to_json(self) -> dict[str, dict[str, int]]:
        """The stored form: topic → partition (decimal string, as JSON keys are) → next offset."""
        out: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in self.items():
            out.setdefault(topic, {})[str(partition)] = offset
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Offsets:
        """Read :meth:`to_json`'s form back; ``where`` names the file in the error."""
        if not isinstance(raw, dict):
            raise OffsetsError(f"{where}: offsets must be an object of topics, got {type(raw).__name__}")
        out = cls()
        for topic, partitions in raw.items():
            if not isinstance(partitions, dict):
                raise OffsetsError(f"{where}: offsets of {topic!r} must be an object of partitions")
            for partition, offset in partitions.items():
                if not (isinstance(partition, str) and partition.isascii() and partition.isdigit()):
                    raise OffsetsError(f"{where}: {topic!r} has a partition {partition!r} that is not a number")
                try:
                    out.set(str(topic), int(partition), offset)
                except OffsetsError as exc:
                    raise OffsetsError(f"{where}: {exc}") from None
        return out
