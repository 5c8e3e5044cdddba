"""Recently popular items: exponentially decayed click counts by item id.

Shipped in every model update so the indexer can serve users it knows nothing about.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


class TrendingCounter:
    """Decayed counts with a half-life in examples, kept to about ``4 × size`` ids.

    Decay is lazy: a click at example t adds 2^(t/half_life), and scores are divided by
    the current 2^(t/half_life) when read; the scale is folded in before it overflows.
    """

    def __init__(self, size: int = 200, half_life: float = 200_000.0) -> None:
        self.size = size
        self.half_life = half_life
        self._scores: dict[str, float] = {}
        self._total = 0.0
        self._t = 0  # examples seen, relative to the last rescale

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def capacity(self) -> int:
        """The most ids held: beyond ``4 × size`` the best ``2 × size`` are kept."""
        return 4 * self.size

    def add(self, item_ids: Iterable[str]) -> None:
        for item_id in item_ids:
            w = 2.0 ** (self._t / self.half_life)
            self._scores[item_id] = self._scores.get(item_id, 0.0) + w
            self._total += w
            self._t += 1
        if self._t > 500 * self.half_life:  # 2^500 is still far from float overflow
            self._rescale()
        if len(self._scores) > 4 * self.size:
            keep = sorted(self._scores.items(), key=lambda kv: kv[1], reverse=True)[: 2 * self.size]
            self._scores = dict(keep)

    def _rescale(self) -> None:
        f = 2.0 ** (-self._t / self.half_life)
        self._scores = {k: v * f for k, v in self._scores.items() if v * f > 1e-12}
        self._total *= f
        self._t = 0

    def top(self, n: int | None = None) -> list[tuple[str, float]]:
        """Up to ``n`` (default ``size``) (item_id, share of recent clicks), best first."""
        n = self.size if n is None else n
        if self._total <= 0:
            return []
        best = sorted(self._scores.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [(k, v / self._total) for k, v in best]

    def to_json(self) -> dict[str, Any]:
        self._rescale()
        return {"size": self.size, "half_life": self.half_life, "total": self._total,
                "scores": sorted(self._scores.items(), key=lambda kv: kv[1], reverse=True)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrendingCounter":
        counter = cls(int(data["size"]), float(data["half_life"]))
        counter._total = float(data["total"])
        counter._scores = {str(k): float(v) for k, v in data["scores"] if math.isfinite(float(v))}
        return counter
