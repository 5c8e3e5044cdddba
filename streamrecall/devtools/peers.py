"""The peers ``streamrecall evaluate`` scores the live system against, each fed the same clicks in
the same order and asked the same questions: most-popular (all-time and recent), item-to-item
collaborative filtering, and the same model trained offline in this process (the ceiling the
live system should reach; ``serving_skew`` is live HR over its HR)."""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any, Iterable

import msgspec

log = logging.getLogger(__name__)


Event = tuple[str, str, dict[str, Any]]


HOUR_MS = 3_600_000


#: The model families; each one the system does not run is an offline peer, ``<tower>_offline``.
TOWERS = ("two_tower", "fm")


#: Clicks the recent-popular peer counts.
RECENT_WINDOW = 5_000


@dataclass(frozen=True)
class Popularity:
    """Click counts *before* a chunk: the head is the 10% most clicked live items so far, the tail
    everything else (new items included); decile 0 holds the most clicked tenth."""

    decile: dict[str, int]
    head: frozenset[str]
    live: int

    @classmethod
    def of(cls, counts: Counter[str], live: Iterable[str]) -> "Popularity":
        ranked = sorted(live, key=lambda i: (-counts.get(i, 0), i))
        n = max(1, len(ranked))
        decile = {item: min(9, 10 * rank // n) for rank, item in enumerate(ranked)}
        head = frozenset(ranked[: max(1, n // 10)])
        return cls(decile, head, len(ranked))


class PopularPeer:
    """Most clicked so far, minus what the user clicked before."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.deleted: set[str] = set()
        self.live: set[str] = set()

    def observe(self, events: Iterable[Event]) -> None:
        for topic, _, v in events:
            if topic == "clicks":
                self.counts[v["item_id"]] += 1
            elif v.get("deleted"):
                self.deleted.add(v["item_id"])
                self.live.discard(v["item_id"])
            else:
                self.deleted.discard(v["item_id"])
                self.live.add(v["item_id"])

    def popularity(self) -> Popularity:
        return Popularity.of(self.counts, self.live)

    def top(self, k: int, seen: set[str]) -> list[str]:
        candidates = heapq.nlargest(k + len(seen) + len(self.deleted), self.counts.items(), key=lambda kv: kv[1])
        return [i for i, _ in candidates if i not in seen and i not in self.deleted][:k]


class RecentPopularPeer:
    """Most clicked among the last ``window`` clicks (trends move; all-time counts lag them)."""

    def __init__(self, window: int) -> None:
        self.window: deque[str] = deque()
        self.size = window
        self.counts: Counter[str] = Counter()
        self.deleted: set[str] = set()

    def observe(self, events: Iterable[Event]) -> None:
        for topic, _, v in events:
            if topic == "items":
                (self.deleted.add if v.get("deleted") else self.deleted.discard)(v["item_id"])
                continue
            self.window.append(v["item_id"])
            self.counts[v["item_id"]] += 1
            if len(self.window) > self.size:
                old = self.window.popleft()
                self.counts[old] -= 1
                if not self.counts[old]:
                    del self.counts[old]

    def top(self, k: int, seen: set[str]) -> list[str]:
        candidates = heapq.nlargest(k + len(seen) + len(self.deleted), self.counts.items(), key=lambda kv: kv[1])
        return [i for i, _ in candidates if i not in seen and i not in self.deleted][:k]


class ItemCFPeer:
    """Item-to-item co-occurrence over each user's last ``history`` clicks, updated online: the
    classic personalised "multi-route" recall that model-based recall is meant to replace.

    sim(i, j) = co(i, j) / sqrt(n_i · n_j) over co-occurrences within a user's recent clicks; a
    user's score for i is the sum of sim(i, j) over the items j in their recent clicks, using
    each j's ``neighbours`` most similar items. Lists shorter than K are filled by popularity.
    """

    def __init__(self, history: int = 10, neighbours: int = 200) -> None:
        self.recent: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=history))
        self.co: dict[str, Counter[str]] = defaultdict(Counter)
        self.n: Counter[str] = Counter()
        self.neighbours = neighbours
        self.popular = PopularPeer()
        self._similar: dict[str, list[tuple[str, float]]] = {}

    def observe(self, events: Iterable[Event]) -> None:
        events = list(events)
        self.popular.observe(events)
        for topic, _, v in events:
            if topic != "clicks":
                continue
            user, item = v["user_id"], v["item_id"]
            recent = self.recent[user]
            for j in set(recent):
                if j != item:
                    self.co[item][j] += 1
                    self.co[j][item] += 1
            self.n[item] += 1
            recent.append(item)
        self._similar.clear()  # the counts moved: neighbour lists are recomputed on demand

    def _neighbours(self, j: str) -> list[tuple[str, float]]:
        out = self._similar.get(j)
        if out is None:
            nj = self.n[j]
            sims = ((i, c / math.sqrt(self.n[i] * nj)) for i, c in self.co[j].items())
            out = self._similar[j] = heapq.nlargest(self.neighbours, sims, key=lambda t: t[1])
        return out

    def top(self, user: str, k: int, seen: set[str]) -> list[str]:
        scores: Counter[str] = Counter()
        for j in self.recent.get(user, ()):
            for i, sim in self._neighbours(j):
                scores[i] += sim
        deleted = self.popular.deleted
        ranked = [i for i, _ in scores.most_common() if i not in seen and i not in deleted][:k]
        if len(ranked) < k:
            have = set(ranked)
            ranked += [i for i in self.popular.top(k + len(ranked), seen) if i not in have][: k - len(ranked)]
        return ranked


@dataclass(frozen=True)
class Replay:
    """Replay after every fresh step (``steps`` draws of ``batch_size`` from a buffer of the last
    ``capacity`` clicks, half-life ``half_life`` clicks): the idle time of a slow stream."""

    steps: int = 0
    capacity: int = 20_000
    half_life: float = 5_000.0
    batch_size: int = 256


class OfflinePeer:
    """The same model config trained in this process on the same clicks, in the same order and in
    the trainer role's batch size, scored by exact search over every live item: the ceiling the
    live system should reach (what serving loses is live HR / this HR). ``replay`` adds replay
    steps after each fresh step (``streamrecall bench model-eval`` measures it this way)."""

    def __init__(self, model: dict[str, Any], batch_size: int, replay: Replay = Replay()) -> None:
        from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, RecentHistory, ReplayBuffer

        self.trainer = OnlineTrainer(ModelConfig(**model))
        self.catalog = ItemCatalog()
        self.history = RecentHistory(self.trainer.config.history_len)
        self.batch_size = batch_size
        self.replay = replay
        self._replay_buffer = ReplayBuffer(replay.capacity, replay.half_life, self.trainer.config.seed) \
            if replay.steps else None
        self.train_seconds = 0.0
        self._buffer: list[Any] = []

    def observe(self, events: Iterable[Event]) -> None:
        from streamrecall.events import Click, Item

        for topic, _, v in events:
            if topic == "items":
                item = msgspec.convert(v, Item)
                if item.deleted:
                    self.catalog.delete(item.item_id)
                else:
                    self.catalog.upsert(item)
                continue
            self._buffer.append(msgspec.convert(v, Click))
            if len(self._buffer) >= self.batch_size:
                self._train()
        self._train()  # the trainer role trains a partial batch once it waited max_batch_wait_ms

    def _train(self) -> None:
        if not self._buffer:
            return
        started = time.perf_counter()
        clicks, self._buffer = self._buffer, []
        histories = self.history.before_each(clicks)
        self.trainer.step(self.trainer.make_batch(clicks, self.catalog, histories))
        if self._replay_buffer is not None:
            self._replay_buffer.add(clicks, histories)
            for _ in range(self.replay.steps):
                self.trainer.replay_step(self._replay_buffer, self.catalog, self.replay.batch_size)
        self.train_seconds += time.perf_counter() - started

    def tops(self, users: list[str], k: int, seen: dict[str, set[str]]) -> dict[str, list[str]]:
        import torch

        ids = list(self.catalog.keys())
        if not ids or not users:
            return {u: [] for u in users}
        model, feat = self.trainer.model, self.trainer.featurizer
        with torch.no_grad():
            items = model.item(feat.encode_items([self.catalog[i] for i in ids]))
            vecs = model.user(feat.users(users, [self.history.get(u) for u in users]))
            scores = vecs @ items.T
        out = {}
        for row, user in enumerate(users):
            user_seen = seen.get(user, set())
            fetch = min(len(ids), k + len(user_seen))
            top = torch.topk(scores[row], fetch).indices.tolist()
            out[user] = [ids[j] for j in top if ids[j] not in user_seen][:k]
        return out
