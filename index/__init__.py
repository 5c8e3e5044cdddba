"""The updatable HNSW index of item vectors, its snapshots and its quality monitor.

No Kafka here: the indexer role (``streamrecall.consumers``) feeds it.
"""

from .errors import IndexStoreError, InvalidInputError, RebuildInProgressError, SnapshotError
from ._rwlock import RWLock
from .hnsw import EncodeFn, ItemIndex
from .quality import QualityMonitor, QualityReport, measure_quality
from .types import Block, Entry, EntryMeta, Hit

__all__ = [
    "Block",
    "EncodeFn",
    "Entry",
    "EntryMeta",
    "Hit",
    "IndexStoreError",
    "InvalidInputError",
    "ItemIndex",
    "QualityMonitor",
    "QualityReport",
    "RWLock",
    "RebuildInProgressError",
    "SnapshotError",
    "measure_quality",
]
