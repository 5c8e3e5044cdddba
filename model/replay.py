"""A bounded buffer of recent clicks to keep training on while the stream is idle or slow.

On a slow stream the trainer takes a step per ``batch_size`` clicks and then waits: with
100k clicks a day it learns about 100 steps a day. Replaying recent clicks fills that idle
time (docs/model.md, "Replay on slow streams"). What it is and is not:

- **Bounded**: the last ``capacity`` clicks, each with the user's history *before* it (as it
  was trained), in a ring; older ones fall out.
- **Weighted toward the newest**: an entry ``a`` clicks old is drawn with probability
  ∝ 2^(−a/half_life), with replacement.
- **Not new evidence**: replayed clicks never reach the frequency estimator or trending
  (p̂ stays the click stream's rate). The in-batch proposal of a replayed batch is not p̂
  either: its columns are draws from this buffer, so :meth:`sample` returns, for each drawn
  entry, the probability that one draw yields that entry's item, Σ of the weights of the
  buffer's entries of that item over the total weight. The trainer's logQ correction of a
  replayed batch uses exactly that (:meth:`OnlineTrainer.replay_step`).

Pure: no clocks, no Kafka; when to replay is the caller's decision (the trainer role replays
one small batch per idle poll, after every fresh click has trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamrecall.model.batch import ClickLike
from streamrecall.model.features import item_key


@dataclass(frozen=True)
class ReplaySample:
    """Drawn entries: clicks, each click's history before it, and ``proposal`` (n,) float64, the
    probability that one draw from the buffer yields that click's item."""

    clicks: list[ClickLike]
    histories: list[tuple[str, ...]]
    proposal: np.ndarray


class ReplayBuffer:
    def __init__(self, capacity: int, half_life: float, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.capacity = capacity
        self.half_life = float(half_life)
        self._clicks: list[ClickLike | None] = [None] * capacity
        self._histories: list[tuple[str, ...]] = [()] * capacity
        self._keys = np.zeros(capacity, dtype=np.int64)
        self._added = 0  # entries ever added; the newest sits at (_added - 1) % capacity
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return min(self._added, self.capacity)

    def add(self, clicks: Sequence[ClickLike], histories: Sequence[Sequence[str]]) -> None:
        """Record trained clicks (oldest first) with each click's history before it."""
        if len(clicks) != len(histories):
            raise ValueError(f"{len(clicks)} clicks but {len(histories)} histories")
        for click, history in zip(clicks, histories):
            slot = self._added % self.capacity
            self._clicks[slot] = click
            self._histories[slot] = tuple(history)
            self._keys[slot] = item_key(click.item_id)
            self._added += 1

    def weights(self) -> np.ndarray:
        """(len,) draw weights by slot, summing to 1: 2^(−age/half_life), age 0 the newest."""
        n = len(self)
        slots = np.arange(n)
        age = (self._added - 1 - slots) % self.capacity if n == self.capacity else (n - 1 - slots)
        w = np.exp2(-age / self.half_life)
        return w / w.sum()

    def sample(self, n: int) -> ReplaySample:
        """``n`` entries drawn with replacement by :meth:`weights` (empty if the buffer is)."""
        size = len(self)
        if size == 0 or n <= 0:
            return ReplaySample([], [], np.zeros(0))
        w = self.weights()
        drawn = self._rng.choice(size, size=n, p=w)
        _, item_of_slot = np.unique(self._keys[:size], return_inverse=True)
        per_item = np.bincount(item_of_slot, weights=w)
        return ReplaySample([self._clicks[i] for i in drawn], [self._histories[i] for i in drawn],  # type: ignore[misc]
                            per_item[item_of_slot[drawn]])
