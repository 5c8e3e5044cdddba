"""The router's own knobs: the ``[router]`` table of the TOML settings file (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from streamrecall.consumers.role_options import role_options
from streamrecall.errors import ConfigError
from streamrecall.settings import Settings

Partial = Literal["answer", "refuse"]


@dataclass(frozen=True)
class RouterOptions:
    """How the router fans out, waits and answers; the HTTP bounds are the indexer's, by the same names."""

    deadline_ms: float = 250.0          # every shard must answer within this of the query's arrival
    partial: str = "answer"             # a shard missing at the deadline: "answer" (flagged partial) or "refuse" (503)
    behind_retry_ms: float = 5.0        # a shard an update behind the others is asked again after this
    down_s: float = 1.0                 # a replica that refused a connection or answered 5xx is tried last this long
    fanout_threads: int = 32            # concurrent requests to shards (each query takes one per shard)
    search_threads: int = 8             # queries answered at once (each mostly waits on its shards)
    ready_max_lag: int = 1000           # /healthz is ready when the user-vectors lag is at most this
    max_user_vectors: int = 1_000_000   # user vectors held (~1.5 KB each); least recently written forgotten
    max_k: int = 1000
    max_body_bytes: int = 1 << 20
    max_batch: int = 256
    http_request_timeout_s: float = 10.0
    http_idle_timeout_s: float = 5.0
    http_max_connections: int = 1024
    http_backlog: int = 1024
    http_shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.partial not in get_args(Partial):
            raise ConfigError(f"router.partial: {self.partial!r} is not one of {', '.join(get_args(Partial))} "
                              "(answer: a partial answer flagged partial; refuse: a 503)")

    @classmethod
    def from_settings(cls, settings: Settings) -> "RouterOptions":
        return role_options(cls, settings, "router")
