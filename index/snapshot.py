"""Snapshot files: an index, its id tables and the stream offsets it covers, written atomically.

Layout under the snapshot directory ``path``::

    path/CURRENT                 one line: the name of the live snapshot, e.g. "snap-000000000007"
    path/snap-000000000007/
        index.hnsw               hnswlib's own binary format (save_index)
        items.msgpack            ids, rows, label generations, per-item metadata (msgspec, no pickle)
        manifest.json            format, index parameters, offsets, counts, sha256 of the two files above

A snapshot is written into ``path/.tmp-*``, every file and the directory are
fsynced, the directory is renamed to ``snap-N``, and only then ``CURRENT`` is
replaced (temp file, fsync, ``os.replace``, fsync of ``path``). A crash at any
point leaves ``CURRENT`` naming the previous, complete snapshot; leftovers are
removed by the next successful write. ``load`` checks the digests before handing
the file to hnswlib.

The offsets are the *next offset to read* per topic/partition: resuming consumers
seek there and replay whatever came after the snapshot (upserts are idempotent).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import hnswlib
import msgspec
import numpy as np

from streamrecall.atomicfile import atomic_write, fsync_dir

from ._store import Params, Store
from .errors import SnapshotError
from .json_rows import item_members

FORMAT = 1
CURRENT = "CURRENT"
_SNAP_RE = re.compile(r"^snap-(\d{12})$")
INDEX_FILE = "index.hnsw"
ITEMS_FILE = "items.msgpack"
MANIFEST_FILE = "manifest.json"
NORM_CHUNK = 8192


class Manifest(msgspec.Struct, frozen=True):
    format: int
    created_at_ms: int
    dim: int
    space: str
    M: int
    ef_construction: int
    ef: int
    seed: int
    capacity: int
    live: int
    slots: int
    offsets: dict[str, Any]
    sha256: dict[str, str]


class ItemsFile(msgspec.Struct, frozen=True):
    """Row tables. Numeric columns are little-endian raw bytes; ``gen`` covers every row (free ones too)."""

    nrows: int
    gen: bytes  # uint32[nrows]
    rows: bytes  # int64[live]
    ids: list[str]
    model_version: bytes  # int64[live]
    encoded_at_ms: bytes  # int64[live]
    event_ts_ms: bytes  # int64[live]
    category_sets: list[tuple[str, ...]]
    category_idx: bytes  # int32[live], index into category_sets
    # float32[live] each; absent in snapshots written before drift existed (norms are then recomputed)
    norm: bytes = b""
    drift: bytes = b""
    retrieved: bytes = b""


# ------------------------------------------------------------------- writing
def write(store: Store, path: Path, offsets: dict[str, Any]) -> Path:
    """Write ``store`` (a private copy: nothing else may touch it) as the new current snapshot under ``path``."""
    path = Path(path)
    try:
        offsets_json = msgspec.json.decode(msgspec.json.encode(offsets))
    except (TypeError, msgspec.EncodeError) as exc:
        raise SnapshotError(f"offsets must be JSON-serialisable: {exc}") from exc
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path))
    try:
        store.hnsw.save_index(str(tmp / INDEX_FILE))
        _write_file(tmp / ITEMS_FILE, msgspec.msgpack.encode(_items_file(store)))
        digests = {name: _sha256(tmp / name) for name in (INDEX_FILE, ITEMS_FILE)}
        p = store.params
        manifest = Manifest(format=FORMAT, created_at_ms=int(time.time() * 1000), dim=p.dim, space=p.space, M=p.M,
                            ef_construction=p.ef_construction, ef=p.ef, seed=p.seed, capacity=store.capacity,
                            live=store.size, slots=store.hnsw.element_count, offsets=offsets_json, sha256=digests)
        _write_file(tmp / MANIFEST_FILE, msgspec.json.encode(manifest))
        _fsync_path(tmp / INDEX_FILE)
        fsync_dir(tmp)
        final = path / f"snap-{_next_seq(path):012d}"
        os.rename(tmp, final)
        fsync_dir(path)
        _publish(path, final.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_old(path, keep=final.name)
    return final


def _items_file(store: Store) -> ItemsFile:
    rows = store.live_rows()
    cat_index: dict[tuple[str, ...], int] = {}
    cats = store.categories[rows].tolist()
    idx = np.fromiter((cat_index.setdefault(c, len(cat_index)) for c in cats), dtype="<i4", count=len(cats))
    return ItemsFile(
        nrows=store.nrows,
        gen=store.gen[: store.nrows].astype("<u4").tobytes(),
        rows=rows.astype("<i8").tobytes(),
        ids=store.ids[rows].tolist(),
        model_version=store.model_version[rows].astype("<i8").tobytes(),
        encoded_at_ms=store.encoded_at_ms[rows].astype("<i8").tobytes(),
        event_ts_ms=store.event_ts_ms[rows].astype("<i8").tobytes(),
        category_sets=list(cat_index),
        category_idx=idx.tobytes(),
        norm=store.norm[rows].astype("<f4").tobytes(),
        drift=store.drift[rows].astype("<f4").tobytes(),
        retrieved=store.retrieved[rows].astype("<f4").tobytes(),
    )


def _write_file(target: Path, data: bytes) -> None:
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(target: Path) -> None:
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(target: Path) -> str:
    h = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _next_seq(path: Path) -> int:
    seqs = [int(m.group(1)) for m in (_SNAP_RE.match(p.name) for p in path.iterdir()) if m]
    return max(seqs, default=0) + 1


def _publish(path: Path, name: str) -> None:
    """Point CURRENT at ``name`` atomically."""
    atomic_write(path / CURRENT, name.encode() + b"\n")


def _remove_old(path: Path, keep: str) -> None:
    for p in path.iterdir():
        if p.name == keep or p.name == CURRENT:
            continue
        if _SNAP_RE.match(p.name) or p.name.startswith(".tmp-"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ------------------------------------------------------------------- reading
def current(path: Path) -> Path | None:
    """The directory CURRENT names, or None when ``path`` holds no snapshot yet."""
    pointer = Path(path) / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _SNAP_RE.match(name):
        raise SnapshotError(f"{pointer} names {name!r}, which is not a snapshot directory name")
    return Path(path) / name


def read(path: Path, num_threads: int) -> tuple[Store, dict[str, Any], Manifest]:
    snap = current(path)
    if snap is None:
        raise SnapshotError(f"no snapshot under {path} (no {CURRENT} file)")
    try:
        manifest = msgspec.json.decode((snap / MANIFEST_FILE).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError) as exc:
        raise SnapshotError(f"cannot read {snap / MANIFEST_FILE}: {exc}") from exc
    if manifest.format != FORMAT:
        raise SnapshotError(f"{snap} has format {manifest.format}; this version reads format {FORMAT}")
    for name, digest in manifest.sha256.items():
        if not (snap / name).exists() or _sha256(snap / name) != digest:
            raise SnapshotError(f"{snap / name} is missing or does not match its digest")
    try:
        items = msgspec.msgpack.decode((snap / ITEMS_FILE).read_bytes(), type=ItemsFile)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"cannot decode {snap / ITEMS_FILE}: {exc}") from exc
    params = Params(dim=manifest.dim, space=manifest.space, M=manifest.M, ef_construction=manifest.ef_construction,
                    ef=manifest.ef, seed=manifest.seed)
    hnsw = hnswlib.Index(space=params.space, dim=params.dim)
    try:
        hnsw.load_index(str(snap / INDEX_FILE), max_elements=manifest.capacity, allow_replace_deleted=True)
    except RuntimeError as exc:
        raise SnapshotError(f"hnswlib cannot load {snap / INDEX_FILE}: {exc}") from exc
    store = Store(params, capacity=max(16, items.nrows), num_threads=num_threads, hnsw=hnsw)
    _fill_tables(store, items)
    if store.size != manifest.live or hnsw.element_count != manifest.slots:
        raise SnapshotError(f"{snap} is inconsistent: {store.size} ids for {manifest.live} live items, "
                            f"{hnsw.element_count} slots for {manifest.slots}")
    return store, dict(manifest.offsets), manifest


def _fill_tables(store: Store, items: ItemsFile) -> None:
    n = items.nrows
    rows = np.frombuffer(items.rows, dtype="<i8").astype(np.intp)
    if len(rows) != len(items.ids) or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
        raise SnapshotError("items file: rows do not match ids")
    store.nrows = n
    store.gen[:n] = np.frombuffer(items.gen, dtype="<u4")
    store.live[rows] = True
    store.ids[rows] = items.ids
    store.model_version[rows] = np.frombuffer(items.model_version, dtype="<i8")
    store.encoded_at_ms[rows] = np.frombuffer(items.encoded_at_ms, dtype="<i8")
    store.event_ts_ms[rows] = np.frombuffer(items.event_ts_ms, dtype="<i8")
    sets = [store._categories.setdefault(tuple(c), tuple(c)) for c in items.category_sets]
    cat_idx = np.frombuffer(items.category_idx, dtype="<i4").tolist()
    for row, item_id, ci in zip(rows.tolist(), items.ids, cat_idx):
        store.categories[row] = sets[ci]
        store.members[row] = item_members(item_id, sets[ci])
    store.row_of = dict(zip(items.ids, rows.tolist()))
    store.free = np.flatnonzero(~store.live[:n]).tolist()[::-1]
    store.recount()
    for name in ("norm", "drift", "retrieved"):
        column = np.frombuffer(getattr(items, name), dtype="<f4")
        if len(column) == len(rows):
            getattr(store, name)[rows] = column
        elif len(column):
            raise SnapshotError(f"items file: {len(column)} {name} values for {len(rows)} items")
    if not len(items.norm) and len(rows):  # written before norms were kept
        for start in range(0, len(rows), NORM_CHUNK):
            part = rows[start:start + NORM_CHUNK]
            store.norm[part] = np.linalg.norm(store.vectors(part), axis=1)
