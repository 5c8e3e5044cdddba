"""Merging the shards' answers into one (docs/api.md, "The router"): pure data in, data out.

Each shard of a sharded index answers with its own exact top-``fetch`` over the items it holds,
scored by its replica of the towers. Items live on exactly one shard (the ``items`` partitions
are split by item id), so the union of the shards' top-``fetch`` lists holds the global
top-``fetch``, and merging by score gives the answer a single indexer would give.

What the merge must not do is mix model versions: every shard reads the same ``model-updates``
topic, but a shard may be an update behind another for a few milliseconds. :func:`one_version`
names the version an answer is scored by (the newest any shard answered with) and the shards
that are behind it; the router asks those again until the deadline and leaves out the ones still
behind, so an answer is scored by one version or is flagged partial, never mixed.

Exclusions and category caps are applied after the merge, in rank order, exactly as the single
indexer applies them (``cap_per_category``), so the caps see the global ranking; a cap may need a
wider fetch (:func:`needs_wider`), as it does on one indexer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

#: What a shard said about one item (the fields of its ``/recall/shard`` answer).
Row = Mapping[str, Any]


@dataclass(frozen=True)
class ShardAnswer:
    """One shard's answer: its rows, best first, and the model version that scored them.

    ``asked`` is how many rows the router asked for: fewer rows back means the shard holds no
    more (after its exclusions), so widening the fetch cannot find more there.
    """

    shard: int
    route: str
    version: int
    rows: Sequence[Row]
    asked: int
    user_encoded: str | None = None
    url: str = ""

    @property
    def exhausted(self) -> bool:
        return len(self.rows) < self.asked


@dataclass(frozen=True)
class Merged:
    """The merged top rows (ranked 1..n) and what they came from."""

    rows: list[dict[str, Any]]
    version: int | None
    answered: list[int]
    missing: dict[int, str] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.missing)


def sort_key(route: str) -> Callable[[Row], tuple[Any, ...]]:
    """How rows of ``route`` rank: by score (the ``recent`` route has none: newest first), ties by id."""
    if route == "recent":
        return lambda r: (-(r.get("event_ts") or 0), r["item_id"])
    return lambda r: (-(r["score"] if r["score"] is not None else -math.inf), r["item_id"])


def one_version(answers: Sequence[ShardAnswer]) -> tuple[int | None, list[int]]:
    """The version an answer is scored by (the newest among ``answers``) and the shards behind it."""
    if not answers:
        return None, []
    newest = max(a.version for a in answers)
    return newest, sorted(a.shard for a in answers if a.version != newest)


def merge(answers: Sequence[ShardAnswer], k: int, *, exclude: Collection[str] = (),
          max_per_category: int | None = None,
          cap: Callable[[Sequence[Row], int, int], list[Row]] | None = None) -> list[dict[str, Any]]:
    """The best ``k`` rows over every answer, excluded ids dropped, then capped per category.

    ``answers`` must all be of one route and one version (:func:`one_version`); ``cap`` is the
    single indexer's ``cap_per_category`` applied to the merged ranking (rows in rank order).
    """
    if not answers:
        return []
    routes = {a.route for a in answers}
    if len(routes) > 1:
        raise ValueError(f"cannot merge answers of different routes: {sorted(routes)}")
    excluded = set(exclude)
    rows = [r for a in answers for r in a.rows if r["item_id"] not in excluded]
    rows.sort(key=sort_key(answers[0].route))
    if max_per_category is not None:
        if cap is None:
            raise ValueError("max_per_category needs the cap function")
        rows = cap(rows, k, max_per_category)
    return [{**r, "rank": n + 1} for n, r in enumerate(rows[:k])]


def needs_wider(answers: Sequence[ShardAnswer], kept: int, k: int, fetch: int, limit: int) -> bool:
    """Whether a capped answer should be asked again with a wider fetch: fewer than ``k`` rows
    passed the cap, some shard may hold more, and the fetch is not at its limit yet."""
    return kept < k and fetch < limit and any(not a.exhausted for a in answers)
