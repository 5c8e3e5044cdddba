"""How a recall API refuses a request, and how category caps are applied (docs/api.md)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

#: How far a ``max_per_category`` query over-fetches, at most (multiples of k, and an absolute floor).
MAX_OVERFETCH_FACTOR = 64
MIN_OVERFETCH = 4096
#: The popular answer's over-fetch under a category cap (multiples of k, at least MIN_OVERFETCH).
POPULAR_OVERFETCH_FACTOR = 8


def popular_overfetch(k: int) -> int:
    """How many newest items the popular answer of ``k`` under a category cap looks at."""
    return max(MIN_OVERFETCH, POPULAR_OVERFETCH_FACTOR * k)


class ApiError(Exception):
    """A request the API refuses; ``status`` is the HTTP status, the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def overfetch_limit(k: int) -> int:
    """The most candidates a ``max_per_category`` query of ``k`` looks at (before the live-item bound)."""
    return max(MIN_OVERFETCH, k * MAX_OVERFETCH_FACTOR)


def cap_per_category(rows: Sequence[Any], k: int, cap: int, categories: Callable[[Any], Sequence[str]]) -> list[Any]:
    """The first ``k`` rows, in order, such that no category appears more than ``cap`` times.

    A row with several categories counts against each and is skipped if any is full;
    rows without categories are never capped.
    """
    counts: dict[str, int] = {}
    out = []
    for row in rows:
        cats = categories(row)
        if any(counts.get(c, 0) >= cap for c in cats):
            continue
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
        out.append(row)
        if len(out) == k:
            break
    return out
