"""A seeded, deterministic synthetic stream of item events and clicks.

Hidden structure, so that a model has something to learn:

- every item has a latent factor vector near its category's centroid; its tags are the
  tags whose directions best match the factor (plus one random tag), its title is built
  from words of those tags and of its category, and its numeric features are noisy
  functions of the factor;
- every user prefers one or two categories (a latent vector near their centroids);
- popularity is Zipf-like over a random ranking of the items;
- each click picks a user (Zipf-like activity), draws ``candidates`` items in proportion
  to popularity among the items that exist at that moment, and keeps the one maximising
  ``preference_strength · ⟨user, item⟩ + Gumbel noise`` — i.e. clicks follow
  popularity × exp(preference).

A share of the catalog (``new_item_share``) is created during the stream; optional
shares of items get a later update or a delete (``deleted: true``). Output is in
stream-time order, and an item's event always precedes any click on it; no click
follows an item's delete.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from streamrecall.errors import ConfigError

_CHUNK = 4096
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class SyntheticConfig:
    n_items: int = 20_000
    n_users: int = 10_000
    n_clicks: int = 200_000
    seed: int = 0
    new_item_share: float = 0.2       # share of items created during the stream (the rest exist at start)
    update_share: float = 0.0         # share of items that get one later update event
    delete_share: float = 0.0         # share of items deleted during the stream
    clicks_per_second: float = 1000.0  # of stream time; sets the click timestamps
    start_ms: int = 1_700_000_000_000
    zipf_exponent: float = 0.8        # item popularity ∝ 1 / rank^s
    user_activity_exponent: float = 0.5
    n_factors: int = 16
    n_categories: int = 40
    n_tags: int = 400
    candidates: int = 256             # popularity-drawn candidates per click
    preference_strength: float = 10.0

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "n_factors", "n_categories", "n_tags", "candidates"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.n_clicks, int) or self.n_clicks < 0:
            raise ConfigError(f"n_clicks must be an int >= 0, got {self.n_clicks!r}")
        for name in ("new_item_share", "update_share", "delete_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.new_item_share >= 1.0:
            raise ConfigError("new_item_share must be < 1: some items must exist when the stream starts")
        for name in ("clicks_per_second", "preference_strength"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.zipf_exponent < 0 or self.user_activity_exponent < 0:
            raise ConfigError("zipf_exponent and user_activity_exponent must be >= 0")


def item_id(index: int) -> str:
    return f"item-{index:07d}"


def user_id(index: int) -> str:
    return f"user-{index:07d}"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _World:
    """The hidden catalog and users, with items indexed in creation order."""

    def __init__(self, c: SyntheticConfig) -> None:
        rng = np.random.default_rng(c.seed)
        self.c = c
        k = c.n_factors
        self.centroids = _unit(rng.normal(size=(c.n_categories, k)))
        self.tag_dirs = _unit(rng.normal(size=(c.n_tags, k)))
        self.item_cat = rng.integers(0, c.n_categories, size=c.n_items)
        self.item_vec = _unit(self.centroids[self.item_cat] + rng.normal(scale=0.25, size=(c.n_items, k)))
        affinity = self.item_vec @ self.tag_dirs.T
        self.item_tags = np.argsort(-affinity, axis=1)[:, :3]
        self.noise_tag = rng.integers(0, c.n_tags, size=c.n_items)
        self.filler = rng.integers(0, 50, size=c.n_items)
        self.price = np.exp(self.item_vec[:, 0] * 2 + rng.normal(scale=0.3, size=c.n_items)) * 10
        self.rating = 1 + 4 / (1 + np.exp(-3 * self.item_vec[:, 1]))
        rank = rng.permutation(c.n_items) + 1
        self.popularity = 1.0 / rank.astype(np.float64) ** c.zipf_exponent
        duration_ms = c.n_clicks / c.clicks_per_second * 1000.0
        self.end_ms = c.start_ms + int(duration_ms)
        n_new = int(round(c.n_items * c.new_item_share))
        created = np.concatenate([
            np.sort(c.start_ms - rng.integers(1, 30 * _DAY_MS, size=c.n_items - n_new)),
            np.sort(c.start_ms + (rng.random(n_new) * duration_ms).astype(np.int64)),
        ])
        self.created = created  # already in creation order, so index order = creation order
        self.alias_prob, self.alias = _alias_table(self.popularity)
        user_cats = rng.integers(0, c.n_categories, size=(c.n_users, 2))
        mix = rng.random((c.n_users, 1))
        self.user_vec = _unit(mix * self.centroids[user_cats[:, 0]] + (1 - mix) * self.centroids[user_cats[:, 1]]
                              + rng.normal(scale=0.2, size=(c.n_users, k)))
        activity = 1.0 / (rng.permutation(c.n_users) + 1.0) ** c.user_activity_exponent
        self.user_cum = np.cumsum(activity)
        self.delete_at = np.full(c.n_items, np.iinfo(np.int64).max, dtype=np.int64)
        n_del = int(round(c.n_items * c.delete_share))
        for i in rng.choice(c.n_items, size=n_del, replace=False):
            self.delete_at[i] = max(self.created[i], c.start_ms) + 1 + int(rng.random() * max(self.end_ms - max(self.created[i], c.start_ms), 1))
        n_upd = int(round(c.n_items * c.update_share))
        self.updates: list[tuple[int, int]] = []
        for i in rng.choice(c.n_items, size=n_upd, replace=False):
            t = max(self.created[i], c.start_ms) + 1 + int(rng.random() * max(self.end_ms - max(self.created[i], c.start_ms), 1))
            if t < self.delete_at[i]:
                self.updates.append((t, int(i)))
        self.rng = rng

    def item_value(self, i: int, *, updated: bool = False, deleted: bool = False) -> dict[str, Any]:
        tags = [f"tag{t}" for t in self.item_tags[i]] + [f"tag{self.noise_tag[i]}"]
        if updated:
            tags.append("refreshed")
        words = [f"word{t}" for t in self.item_tags[i][:2]] + [f"cat{self.item_cat[i]}word", f"filler{self.filler[i]}"]
        value: dict[str, Any] = {
            "item_id": item_id(i),
            "created_at": int(self.created[i]),
            "title": " ".join(words).title(),
            "categories": [f"cat{self.item_cat[i]}"],
            "tags": tags,
            "features": {"price": round(float(self.price[i]) * (0.9 if updated else 1.0), 2),
                         "rating": round(float(self.rating[i]), 2)},
        }
        if deleted:
            value["deleted"] = True
        return value


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: draw slot i uniformly, keep it with prob[i], else take alias[i]."""
    n = len(weights)
    scaled = weights / weights.sum() * n
    prob = np.ones(n)
    alias = np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


def generate(config: SyntheticConfig) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(topic, key, value) events, topic in {"items", "clicks"}, in stream-time order."""
    w = _World(config)
    c = config
    rng = w.rng
    # Item events as (time, order, index, kind): creations, updates, deletes.
    item_events: list[tuple[int, int, int, str]] = [(int(t), 0, i, "create") for i, t in enumerate(w.created)]
    item_events += [(t, 1, i, "update") for t, i in w.updates]
    item_events += [(int(t), 2, i, "delete") for i, t in enumerate(w.delete_at) if t != np.iinfo(np.int64).max]
    item_events.sort()
    pending = 0  # next item event to emit
    step_ms = 1000.0 / c.clicks_per_second
    for start in range(0, c.n_clicks, _CHUNK):
        n = min(_CHUNK, c.n_clicks - start)
        ts = c.start_ms + (np.arange(start, start + n) * step_ms).astype(np.int64)
        t0, t1 = int(ts[0]), int(ts[-1])
        # Everything up to and including t0 is visible to this chunk's clicks.
        while pending < len(item_events) and item_events[pending][0] <= t0:
            yield _item_event(w, item_events[pending])
            pending += 1
        available = int(np.searchsorted(w.created, t0, side="right"))
        clicks = _draw_clicks(w, rng, n, available, t1)
        chunk_events = []
        while pending < len(item_events) and item_events[pending][0] <= t1:
            chunk_events.append(item_events[pending])
            pending += 1
        click_iter = ((int(t), 1, j) for j, t in enumerate(ts))
        for t, kind, j in heapq.merge(((e[0], 0, e) for e in chunk_events), click_iter, key=lambda x: (x[0], x[1])):
            if kind == 0:
                yield _item_event(w, j)
            elif clicks[0][j] >= 0:
                u, i = clicks[0][j], clicks[1][j]
                yield "clicks", user_id(u), {"user_id": user_id(u), "item_id": item_id(i), "ts": t, "weight": 1.0}
    for event in item_events[pending:]:
        yield _item_event(w, event)


def _item_event(w: _World, event: tuple[int, int, int, str]) -> tuple[str, str, dict[str, Any]]:
    _, _, i, kind = event
    return "items", item_id(i), w.item_value(i, updated=kind == "update", deleted=kind == "delete")


def _draw_clicks(w: _World, rng: np.random.Generator, n: int, available: int, t_end: int) -> tuple[list[int], list[int]]:
    """n (user, item) pairs among the first ``available`` items, none deleted by ``t_end``."""
    users = np.searchsorted(w.user_cum, rng.random(n) * w.user_cum[-1], side="right")
    users = np.minimum(users, len(w.user_cum) - 1)
    # Popularity draws over the whole catalog in O(1) each (alias method); candidates not
    # created yet are rejected below, which leaves popularity draws among existing items.
    slots = rng.integers(0, len(w.alias), size=(n, w.c.candidates))
    cand = np.where(rng.random(slots.shape) < w.alias_prob[slots], slots, w.alias[slots])
    scores = w.c.preference_strength * np.einsum("nk,nck->nc", w.user_vec[users], w.item_vec[cand])
    scores += rng.gumbel(size=scores.shape)
    scores[(w.delete_at[cand] <= t_end) | (cand >= available)] = -np.inf
    best = np.argmax(scores, axis=1)
    items = cand[np.arange(n), best]
    valid = np.isfinite(scores[np.arange(n), best])
    users = np.where(valid, users, -1)
    return users.tolist(), items.tolist()
