"""The trainer's knobs: the ``[trainer]`` table of the settings file (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass

from streamrecall.consumers.role_options import role_options
from streamrecall.model.catalog import DEFAULT_MAX_ITEMS
from streamrecall.settings import Settings

ROLE = "trainer"


@dataclass(frozen=True)
class TrainerOptions:
    """The ``[trainer]`` table of the settings file."""

    batch_size: int = 1024             # clicks per training step, at most
    max_batch_wait_ms: int = 200       # a partial batch is trained after its oldest click waited this long
    publish_every_steps: int = 20      # while a backlog is trained, publish after this many steps (and at every flush)
    dense_every_s: float = 0.0         # dense layers travel at most this often (0: in every update)
    full_every_s: float = 60.0         # a full update (dense layers + every trained row) at most this often
    checkpoint_every_s: float = 30.0   # checkpoint at the first flush this long after the last one
    history_users: int = 500_000       # users whose recent clicks are kept (LRU beyond)
    catalog_items: int = DEFAULT_MAX_ITEMS  # items of the items table kept (least recently upserted forgotten beyond)
    publish_backoff_s: float = 1.0     # after a failed publish, wait this long before the next attempt...
    publish_backoff_max_s: float = 60.0  # ...doubling with each failure in a row, up to this
    startup_timeout_s: float = 120.0   # bound on reading the items table at start
    replay_capacity: int = 0           # clicks kept to replay while the stream is idle (0: no replay; docs/model.md)
    replay_batch_size: int = 256       # clicks per replay step: one step per idle poll, so keep it small
    replay_half_life: float = 5_000.0  # a buffered click this many clicks old is drawn half as often

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainerOptions":
        return role_options(cls, settings, ROLE, may_be_zero=("dense_every_s", "replay_capacity"))
