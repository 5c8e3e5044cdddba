"""The indexer's knobs: the ``[indexer]`` table of the settings file (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from streamrecall.consumers.role_options import role_options
from streamrecall.errors import ConfigError
from streamrecall.settings import Settings

ROLE = "indexer"


@dataclass(frozen=True)
class IndexerOptions:
    """The indexer's own knobs: the ``[indexer]`` table of the TOML settings file."""

    snapshot_interval_s: float = 30.0   # a snapshot at most this often (and one at shutdown)
    encode_batch: int = 512             # items encoded and upserted per locked step of the poll loop
    reencode_batch: int = 256           # items encoded per step of the background re-encoder (outside the state lock)
    quality_interval_s: float = 30.0    # recall@10 measured this often (background thread)
    ready_max_lag: int = 1000           # /healthz is ready when total lag is at most this many records
    max_k: int = 1000                   # largest k a query may ask for
    max_body_bytes: int = 1 << 20       # POST bodies above this answer 413
    max_batch: int = 256                # queries per POST /recall/batch; more answer 413
    http_request_timeout_s: float = 10.0  # a request must arrive whole within this (else 408, closed)
    http_idle_timeout_s: float = 5.0    # a kept-alive connection idle this long is closed
    http_max_connections: int = 1024    # open connections per listener; more are answered 503
    http_backlog: int = 1024            # listen backlog (capped by the kernel's net.core.somaxconn)
    http_shutdown_timeout_s: float = 10.0  # in-flight requests get this long to finish at shutdown
    search_threads: int = 2             # threads that run searches and query-time encodes (off the event loop)
    replay_timeout_s: float = 120.0     # bound on re-reading model updates at start-up
    ef: int = 64                        # HNSW search breadth
    M: int = 16                         # HNSW graph degree
    ef_construction: int = 200
    rescore_factor: float = 2.0         # graph candidates per result, re-scored by the current towers (>= 1)
    rebuild_interval_s: float = 5.0     # after dense changes, rebuild the graph at most this often
    rebuild_busy_share: float = 0.5     # and rebuilding at most this share of the time (a 1M-item build takes minutes)
    reencode_drift_bound: float = 0.05  # re-encode an item once the rows updates moved may have moved its vector this far (share of its norm)
    reencode_items_per_s: float = 2000.0  # the re-encode budget: drifted items re-encoded in place at most this fast
    stale_after_versions: int = 100     # staleness gauges: items encoded by a version more than this many versions behind,
    stale_after_s: float = 60.0         # or by a model more than this many seconds older than the current one
    overlap_interval_s: float = 30.0    # serving-overlap measurement this often (background thread)
    overlap_sample_size: int = 32       # latest live queries asked again per measurement
    overlap_max_items: int = 50_000     # no overlap measurement above this many items (it encodes them all)
    max_user_vectors: int = 1_000_000   # user vectors held for /recall (~1.5 KB each); least recently written forgotten
    item_vector_cache_items: int = 200_000  # current-version candidate vectors cached for re-scoring (cleared when full)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"indexer.{f.name}: must be a positive number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"indexer.{f.name}: must be an integer, got {value!r}")
        if self.rescore_factor < 1:
            raise ConfigError(f"indexer.rescore_factor: must be >= 1, got {self.rescore_factor!r}")
        if self.rebuild_busy_share > 1:
            raise ConfigError(f"indexer.rebuild_busy_share: must be in (0, 1], got {self.rebuild_busy_share!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> "IndexerOptions":
        return role_options(cls, settings, "indexer")
