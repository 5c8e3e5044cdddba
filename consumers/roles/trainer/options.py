"""The trainer's knobs: the ``[trainer]`` table of the settings file (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass

from streamrecall.consumers.role_options import role_options
from streamrecall.model.catalog import DEFAULT_MAX_ITEMS
from streamrecall.settings import Settings

ROLE = "trainer"


#: However big the model, a full update is due at least this often (unless ``full_every_s`` says
#: longer): a fresh replica starts from the last one, so the topic's retention (1 h by default) must
#: keep it whole, and a replica that missed a delta waits for it.
FULL_INTERVAL_MAX_S = 1800.0


def full_interval_s(options: "TrainerOptions", last_full_bytes: int) -> float:
    """Seconds from one full update to the next: ``full_every_s``, or longer for a big model, so that
    full updates use at most ``full_bytes_per_s`` of ``model-updates`` on average (up to
    :data:`FULL_INTERVAL_MAX_S`). A full update's bytes grow with the rows trained (~264 B a row at
    dim 64: ~200 MB at a million): at one a minute that was 3.5 MB/s written and decoded by every
    replica, and the embedded broker, which keeps every record in memory, grew 500 MB a minute."""
    if options.full_bytes_per_s <= 0:
        return options.full_every_s
    return max(options.full_every_s, min(last_full_bytes / options.full_bytes_per_s, FULL_INTERVAL_MAX_S))


@dataclass(frozen=True)
class TrainerOptions:
    """The ``[trainer]`` table of the settings file."""

    batch_size: int = 1024             # clicks per training step, at most
    max_batch_wait_ms: int = 200       # a partial batch is trained after its oldest click waited this long
    publish_every_steps: int = 20      # while a backlog is trained, publish after this many steps (and at every flush)
    dense_every_s: float = 0.0         # dense layers travel at most this often (0: in every update)
    full_every_s: float = 60.0         # a full update (dense layers + every trained row) at most this often...
    full_bytes_per_s: float = 524_288.0  # ...and, on average, full updates at most this many bytes a second
                                       # (0: no bound; see full_interval_s)
    checkpoint_every_s: float = 30.0   # checkpoint at the first flush this long after the last one
    history_users: int = 500_000       # users whose recent clicks are kept (LRU beyond)
    catalog_items: int = DEFAULT_MAX_ITEMS  # items of the items table kept (least recently upserted forgotten beyond)
    publish_backoff_s: float = 1.0     # after a failed publish, wait this long before the next attempt...
    publish_backoff_max_s: float = 60.0  # ...doubling with each failure in a row, up to this
    startup_timeout_s: float = 120.0   # bound on reading the items table at start
    replay_capacity: int = 0           # clicks kept to replay while the stream is idle (0: no replay; docs/model.md)
    replay_batch_size: int = 256       # clicks per replay step: one step per idle poll, so keep it small
    replay_half_life: float = 5_000.0  # a buffered click this many clicks old is drawn half as often
    # Data-parallel jobs (--world-size > 1; docs/roles.md):
    rank_poll_ms: int = 20             # each rank polls at most this long per round: an idle rank's bound on a busy one's wait
    collective_timeout_s: float = 60.0  # a rank that answers no collective for this long fails the job (it restarts)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainerOptions":
        return role_options(cls, settings, ROLE, may_be_zero=("dense_every_s", "replay_capacity", "full_bytes_per_s"))
