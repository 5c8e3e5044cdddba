"""Stable hashing of ids and tokens, and vectorised featurisation of items and users.

Why hashing: the trainer, the indexer and the publisher must map the same id to the
same table row with no shared vocabulary, across processes and restarts. Python's
``hash()`` is salted per process, so we use BLAKE2b (stable everywhere). An id never
seen before simply lands in its bucket; collisions are the price of a fixed table.

How an item nobody has clicked still gets a meaningful vector: the item tower reads
two inputs, the item's id row (zero until a click trains it) and the pooled rows of
its *content tokens* — categories, tags, title words and numeric features — which are
shared with every other item carrying the same tokens and are trained by their clicks.
A brand-new item therefore starts at the content vector of its tokens and is
retrievable the moment its ``items`` event is encoded.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from streamrecall.model.config import ModelConfig

_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_TITLE_WORDS = 32
_CACHE_LIMIT = 500_000  # featurised items kept; cleared wholesale when full (cheap, rare)


class ItemLike(Protocol):
    """What featurisation reads from an item (``streamrecall.events.Item`` fits)."""

    item_id: str
    title: str | None
    categories: tuple[str, ...]
    tags: tuple[str, ...]
    features: Mapping[str, float]


def hash64(text: str, namespace: str) -> int:
    """A stable non-negative 63-bit hash of ``text`` in ``namespace`` (fits int64)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=namespace.encode()[:16]).digest()
    return int.from_bytes(digest, "little") >> 1


def item_key(item_id: str) -> int:
    """The 63-bit key of an item id: used for accidental-hit masking and the estimator."""
    return hash64(item_id, "item")


def user_key(user_id: str) -> int:
    return hash64(user_id, "user")


def token_bucket(token: str, buckets: int) -> int:
    return hash64(token, "token") % buckets


def title_words(title: str | None) -> list[str]:
    """Lower-cased word tokens of a title, at most 32."""
    if not title:
        return []
    return _WORD.findall(title.lower())[:_MAX_TITLE_WORDS]


def numeric_bin(value: float) -> int:
    """The bin of a numeric feature: round(4·sign(x)·log1p(|x|)), clamped to ±64.

    Numeric features become tokens (``f:price:9``) rather than one shared row scaled by
    the value: a shared row would push every item's content vector the same way.
    """
    return max(-64, min(64, round(4.0 * math.copysign(math.log1p(abs(value)), value))))


@dataclass(frozen=True)
class ItemFeatures:
    """A batch of n items, ready for ``F.embedding_bag`` (sum mode with per-sample weights).

    keys (n,) int64 — 63-bit item keys; id_rows (n,) int64 — rows of the item-id table;
    token_rows (T,) int64, token_weights (T,) float32, token_offsets (n,) int64 — the
    content bags (an item with no content has an empty bag, i.e. a zero content vector).
    """

    keys: torch.Tensor
    id_rows: torch.Tensor
    token_rows: torch.Tensor
    token_weights: torch.Tensor
    token_offsets: torch.Tensor

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def select(self, index: torch.Tensor) -> "ItemFeatures":
        """The items at ``index`` (1-D int64), in that order."""
        flat, offsets = select_bags(self.token_offsets, int(self.token_rows.shape[0]), index)
        return ItemFeatures(self.keys[index], self.id_rows[index], self.token_rows[flat],
                            self.token_weights[flat], offsets)


@dataclass(frozen=True)
class UserFeatures:
    """A batch of n users: id_rows (n,) rows of the user-id table; history_rows (H,),
    history_weights (H,) float32 and history_offsets (n,) — each user's last ``history_len``
    clicked items (oldest first) as rows of the *item-id* table, with pooling weights that sum
    to 1 per user (see :func:`history_weights`; an empty history pools to zero)."""

    id_rows: torch.Tensor
    history_rows: torch.Tensor
    history_weights: torch.Tensor
    history_offsets: torch.Tensor

    def __len__(self) -> int:
        return int(self.id_rows.shape[0])

    def select(self, index: torch.Tensor) -> "UserFeatures":
        flat, offsets = select_bags(self.history_offsets, int(self.history_rows.shape[0]), index)
        return UserFeatures(self.id_rows[index], self.history_rows[flat], self.history_weights[flat], offsets)


def history_weights(n: int, pooling: str, half_life: float) -> np.ndarray:
    """(n,) float32 pooling weights of a history of n items, oldest first, summing to 1.

    ``mean``: 1/n each (an old click counts like the last one). ``decay``: proportional to
    2^(−age/half_life) with age 0 for the newest click, so the last clicks dominate and a click
    ``half_life`` clicks older counts half.
    """
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    if pooling == "mean":
        return np.full(n, 1.0 / n, dtype=np.float32)
    w = np.exp2(-(np.arange(n - 1, -1, -1, dtype=np.float64)) / half_life)
    return (w / w.sum()).astype(np.float32)


def bag_index(offsets: torch.Tensor, n_values: int) -> torch.Tensor:
    """(n_values,) int64: the bag each value of a flat bag array belongs to."""
    ends = torch.cat([offsets[1:], torch.tensor([n_values], dtype=torch.int64)])
    return torch.repeat_interleave(torch.arange(offsets.shape[0]), ends - offsets)


def select_bags(offsets: torch.Tensor, n_values: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the flat value array of the bags at ``index``, and their new offsets."""
    ends = torch.cat([offsets[1:], torch.tensor([n_values], dtype=torch.int64)])
    lengths = (ends - offsets)[index]
    new_offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    flat = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(offsets[index] - new_offsets, lengths)
    return flat, new_offsets


@dataclass(frozen=True)
class _Featurised:
    item: object
    key: int
    tokens: np.ndarray   # int64 rows of the token table
    weights: np.ndarray  # float32


class Featurizer:
    """Turns items and users into table rows. Caches per id, so a hot item is hashed once.

    Content tokens of an item, in this order and capped at ``max_tokens``: categories
    (``c:``), tags (``t:``), title words (``w:``), then numeric features as binned tokens
    (``f:name:bin``, see :func:`numeric_bin`); each weighted 1/n so the bag is their mean.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._items: dict[str, _Featurised] = {}
        self._item_keys: dict[str, int] = {}
        self._user_rows: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._pool_weights: dict[int, np.ndarray] = {}

    # ---- single ids --------------------------------------------------------------
    def item_key(self, item_id: str) -> int:
        key = self._item_keys.get(item_id)
        if key is None:
            if len(self._item_keys) >= _CACHE_LIMIT:
                self._item_keys.clear()
            key = self._item_keys[item_id] = item_key(item_id)
        return key

    def user_row(self, user_id: str) -> int:
        row = self._user_rows.get(user_id)
        if row is None:
            if len(self._user_rows) >= _CACHE_LIMIT:
                self._user_rows.clear()
            row = self._user_rows[user_id] = user_key(user_id) % self.config.id_buckets
        return row

    def _token(self, token: str) -> int:
        row = self._tokens.get(token)
        if row is None:
            if len(self._tokens) >= _CACHE_LIMIT:
                self._tokens.clear()
            row = self._tokens[token] = token_bucket(token, self.config.token_buckets)
        return row

    # ---- items -------------------------------------------------------------------
    def _featurise(self, item: ItemLike) -> _Featurised:
        cached = self._items.get(item.item_id)
        if cached is not None and (cached.item is item or cached.item == item):
            return cached
        words = [f"c:{c}" for c in item.categories] + [f"t:{t}" for t in item.tags] \
            + [f"w:{w}" for w in title_words(item.title)]
        room = self.config.max_tokens - len(words)
        words += [f"f:{name}:{numeric_bin(float(v))}" for name, v in sorted(item.features.items())[: max(room, 0)]]
        words = words[: self.config.max_tokens]
        rows = [self._token(w) for w in words]
        weights = [1.0 / len(words)] * len(words) if words else []  # no content: the id row alone
        out = _Featurised(item, self.item_key(item.item_id), np.asarray(rows, dtype=np.int64),
                          np.asarray(weights, dtype=np.float32))
        if len(self._items) >= _CACHE_LIMIT:
            self._items.clear()
        self._items[item.item_id] = out
        return out

    def items(self, item_ids: Sequence[str], catalog: Mapping[str, ItemLike]) -> tuple[ItemFeatures, int]:
        """Features of ``item_ids``, looking content up in ``catalog``.

        An id missing from the catalog gets its id row only (an empty content bag);
        the second return value counts those.
        """
        parts: list[_Featurised | None] = []
        keys: list[int] = []
        unknown = 0
        for item_id in item_ids:
            item = catalog.get(item_id)
            if item is None:
                unknown += 1
                parts.append(None)
                keys.append(self.item_key(item_id))
            else:
                f = self._featurise(item)
                parts.append(f)
                keys.append(f.key)
        return self._assemble(keys, parts), unknown

    def encode_items(self, items: Sequence[ItemLike]) -> ItemFeatures:
        """Features of item objects (all content known)."""
        parts = [self._featurise(item) for item in items]
        return self._assemble([p.key for p in parts], parts)

    def _assemble(self, keys: list[int], parts: list["_Featurised | None"]) -> ItemFeatures:
        empty_i = np.zeros(0, dtype=np.int64)
        empty_f = np.zeros(0, dtype=np.float32)
        tokens = [p.tokens if p is not None else empty_i for p in parts]
        weights = [p.weights if p is not None else empty_f for p in parts]
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        offsets = np.zeros(len(tokens), dtype=np.int64)
        if len(tokens) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        key_t = torch.tensor(keys, dtype=torch.int64)
        return ItemFeatures(
            keys=key_t,
            id_rows=key_t % self.config.id_buckets,
            token_rows=torch.from_numpy(np.concatenate(tokens) if tokens else empty_i),
            token_weights=torch.from_numpy(np.concatenate(weights) if weights else empty_f),
            token_offsets=torch.from_numpy(offsets),
        )

    def item_rows(self, item_ids: Sequence[str]) -> list[int]:
        buckets = self.config.id_buckets
        return [self.item_key(i) % buckets for i in item_ids]

    # ---- users -------------------------------------------------------------------
    def users(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> UserFeatures:
        """Features of users from their ids and their recent clicked item ids (oldest first)."""
        n = self.config.history_len
        buckets = self.config.id_buckets
        pooling, half_life = self.config.history_pooling, self.config.history_half_life
        rows: list[int] = []
        offsets: list[int] = []
        weights: list[np.ndarray] = []
        for history in histories:
            offsets.append(len(rows))
            recent = history[-n:] if len(history) > n else history
            rows.extend(self.item_key(i) % buckets for i in recent)
            weights.append(self._history_weights(len(recent), pooling, half_life))
        return UserFeatures(
            id_rows=torch.tensor([self.user_row(u) for u in user_ids], dtype=torch.int64),
            history_rows=torch.tensor(rows, dtype=torch.int64),
            history_weights=torch.from_numpy(np.concatenate(weights) if weights else np.zeros(0, dtype=np.float32)),
            history_offsets=torch.tensor(offsets, dtype=torch.int64),
        )

    def _history_weights(self, n: int, pooling: str, half_life: float) -> np.ndarray:
        cached = self._pool_weights.get(n)
        if cached is None:  # at most history_len + 1 lengths: computed once each
            cached = self._pool_weights[n] = history_weights(n, pooling, half_life)
        return cached
