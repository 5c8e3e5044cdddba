"""The indexer's snapshot: the index, the item content, and where to resume, as one unit.

Layout under ``state_dir/indexer/``::

    index/                       ItemIndex snapshots (index/snapshot.py: CURRENT + snap-N/)
    catalog-<ns>.msgpack         the item content (the live ``Item`` events) the index was built from

Written in this order: the catalog file (temp file, fsync, rename, directory fsync), then the
index snapshot, whose manifest carries the :class:`Resume` record below — including the
catalog file's name and digest — and only becomes current with an atomic rename. Catalog
files no longer named by the current snapshot are removed afterwards. A crash at any point
leaves the previous snapshot and the catalog file it names intact.

:class:`Resume` records the **next offset to read** per partition of ``items`` and
``model-updates`` (one :class:`~streamrecall.consumers.offsets.Offsets`, in its stored form), the replica's version, the latest version whose re-encode had finished
(``settled_version``), the epoch the index served and the offset of the last *full* model
update applied. ``user-vectors`` offsets are deliberately absent: that compacted topic is
always re-read from its beginning.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from streamrecall.atomicfile import atomic_write
from streamrecall.consumers.offsets import Offsets
from streamrecall.events import Item
from streamrecall.index import ItemIndex, SnapshotError
from streamrecall.index import snapshot as index_snapshot

log = logging.getLogger(__name__)

#: 2: offsets in the one stored form of Offsets (1 had ``items`` and ``model_updates`` fields; still read).
FORMAT = 2
READABLE_FORMATS = (1, 2)
INDEX_DIR = "index"
CATALOG_PREFIX = "catalog-"


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """Where a restarted indexer resumes. Offsets are the *next offset to read*, by partition."""

    format: int = FORMAT
    offsets: dict[str, dict[str, int]] = {}
    items: dict[str, int] = {}  # format 1
    model_updates: dict[str, int] = {}  # format 1
    replica_version: int = 0
    settled_version: int = 0
    served_epoch: int = 0
    epochs: list[int] = msgspec.field(default_factory=lambda: [0])
    last_full_partition: int | None = None
    last_full_offset: int | None = None
    catalog: str = ""
    catalog_sha256: str = ""
    written_at_ms: int = 0

    def next_offsets(self) -> Offsets:
        """The next offsets to read of ``items`` and ``model-updates`` (either format)."""
        if self.format == 1:
            return Offsets.from_json({"items": self.items, "model-updates": self.model_updates}, "indexer snapshot")
        return Offsets.from_json(self.offsets, "indexer snapshot")


class _Catalog(msgspec.Struct, frozen=True):
    items: list[Item]


@dataclass
class Loaded:
    index: ItemIndex
    catalog: dict[str, Item]
    resume: Resume


def write(root: Path, index: ItemIndex, items: list[Item], resume: Resume) -> Path:
    """Write catalog + index + ``resume`` as the new current snapshot under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    data = msgspec.msgpack.encode(_Catalog(items))
    name = f"{CATALOG_PREFIX}{time.time_ns():020d}.msgpack"
    atomic_write(root / name, data)
    resume = msgspec.structs.replace(resume, catalog=name, catalog_sha256=hashlib.sha256(data).hexdigest(),
                                     written_at_ms=int(time.time() * 1000))
    try:
        path = index.snapshot(root / INDEX_DIR, msgspec.to_builtins(resume))
    except BaseException:
        (root / name).unlink(missing_ok=True)
        raise
    for old in root.glob(f"{CATALOG_PREFIX}*.msgpack"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def exists(root: Path) -> bool:
    return index_snapshot.current(root / INDEX_DIR) is not None


def load(root: Path) -> Loaded | None:
    """The current snapshot under ``root``, or None when there is none. Raises SnapshotError if it is broken."""
    if not exists(root):
        return None
    index, offsets = ItemIndex.load(root / INDEX_DIR)
    try:
        resume = msgspec.convert(offsets, Resume)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"{root}: snapshot offsets are not an indexer resume record: {exc}") from None
    if resume.format not in READABLE_FORMATS:
        raise SnapshotError(f"{root}: indexer snapshot format {resume.format}; this version reads {READABLE_FORMATS}")
    path = root / resume.catalog
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read the catalog file {path}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != resume.catalog_sha256:
        raise SnapshotError(f"{path} does not match the digest its snapshot recorded")
    items = msgspec.msgpack.decode(data, type=_Catalog).items
    return Loaded(index, {it.item_id: it for it in items}, resume)


def read_resume(root: Path) -> dict[str, Any] | None:
    """The current snapshot's resume record as plain JSON (for tools and tests), without loading the index."""
    snap = index_snapshot.current(root / INDEX_DIR)
    if snap is None:
        return None
    manifest = msgspec.json.decode((snap / index_snapshot.MANIFEST_FILE).read_bytes())
    return manifest["offsets"]
