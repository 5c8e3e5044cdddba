"""The publisher role: clicks and model updates in, fresh user vectors out (docs/roles.md).

- ``clicks`` (group subscription, split by user): each user's recent items are kept per
  clicks partition; users with new clicks are encoded in micro-batches (published at the
  end of each polled batch by default, at most ``flush_ms`` later, or as soon as
  ``flush_users`` are pending) and sent to the compacted ``user-vectors`` topic.
- ``model-updates`` (a side reader: every publisher applies every update, from the last
  full one): on a new version, recently active users are re-published in the background, most
  recently active first (only those the update touches, for a sparse delta), in rounds at most
  every ``refresh_interval_s``: at most ``refresh_per_s`` users a second while clicks flow,
  ``refresh_per_tick`` per loop iteration when they pause. The indexer does not wait for them: it encodes
  a user whose stored vector is of another version at query time.
- State moves with a partition: a newly assigned clicks partition is rebuilt from the
  same-numbered partition of ``user-vectors`` (its ``recent_items`` are the history), and
  replayed clicks at or before a user's ``event_ts`` there are skipped.
- ``flush`` publishes what is pending and flushes the producer before the runtime commits.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamrecall.consumers.app import deadletter_sink, model_config, run_handler
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.role_options import role_options
from streamrecall.consumers.runtime import HandlerBase, Record
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.table import TopicReader
from streamrecall.consumers.updates import ModelUpdateFeed, update_max_bytes
from streamrecall.errors import ConfigError, TransientError
from streamrecall.events import Click, Decoder, UserVector, encode, user_vector_decoder
from streamrecall.bounded import LRUMap
from streamrecall.metrics import MODEL_VERSION, STATE, ModelVersionMetrics, PublisherMetrics, StateMetrics, role_metrics
from streamrecall.model import Applied, ModelUpdate, RecentHistory, TowerReplica
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

ROLE = "publisher"
#: Freshness bound: pending users are never held longer than this (ms).
MAX_FLUSH_MS = 200
#: While clicks flow, re-publication never bursts more than this many seconds of its rate at once.
REFRESH_BURST_S = 0.1


@dataclass(frozen=True)
class PublisherOptions:
    """The ``[publisher]`` table of the settings file."""

    flush_ms: int = 0                  # 0: publish at the end of every polled batch; else at most this late
    flush_users: int = 1024            # publish as soon as this many users are pending
    history_users: int = 200_000       # users kept per clicks partition (least recently active forgotten)
    refresh_active_s: float = 3600.0   # after a model update, re-publish users active this recently
    refresh_per_tick: int = 256        # users checked and re-published per loop iteration while no clicks flow
    refresh_per_s: float = 200.0       # while clicks flow: at most this many users re-published per second
    refresh_interval_s: float = 10.0   # re-publication rounds start at most this often (updates come every flush)
    startup_timeout_s: float = 120.0   # bound on catching up with model-updates at start
    rebuild_timeout_s: float = 120.0   # bound on rebuilding one partition from user-vectors

    @classmethod
    def from_settings(cls, settings: Settings) -> "PublisherOptions":
        options = role_options(cls, settings, ROLE, may_be_zero=("flush_ms",))
        if options.flush_ms > MAX_FLUSH_MS:
            raise ConfigError(f"publisher.flush_ms: must be from 0 to {MAX_FLUSH_MS}, got {options.flush_ms}")
        return options


class VectorSink(Protocol):
    def send(self, vector: UserVector, partition: int) -> None: ...

    def flush(self) -> list[tuple[int, str]]:
        """Wait until everything sent is durable; returns the (partition, user_id) sends that failed."""


class KafkaVectorSink:
    """Sends vectors to ``user-vectors`` keyed by user id, into the clicks partition's number."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._sent: list[tuple[object, int, str]] = []

    def send(self, vector: UserVector, partition: int) -> None:
        future = self.producer.send(self.topic, key=vector.user_id.encode(), value=encode(vector),
                                    partition=partition)
        self._sent.append((future, partition, vector.user_id))

    def flush(self) -> list[tuple[int, str]]:
        self.producer.flush(timeout=30)
        sent, self._sent = self._sent, []
        failed = [(p, u) for f, p, u in sent if not f.is_done or f.failed()]  # type: ignore[attr-defined]
        if failed:
            log.error("%d user vectors were not published; they will be sent again", len(failed))
        return failed


class PartitionState:
    """One clicks partition's users: recent items, newest click ts, last activity (LRU order)."""

    def __init__(self, history_len: int, max_users: int) -> None:
        self.max_users = max_users
        self.history = RecentHistory(history_len, max_users)
        self.users: LRUMap[str, list[float]] = LRUMap(max_users)  # user → [event_ts ms, last active (clock s)]
        self.replay_floor: dict[str, int] = {}  # user → event_ts of the vector the state was rebuilt from

    def click(self, click: Click, now: float) -> bool:
        """Record a click; False when it is a replay of one the rebuilt vector already covers."""
        floor = self.replay_floor.get(click.user_id)
        if floor is not None:
            if click.ts <= floor:
                return False
            del self.replay_floor[click.user_id]  # replay of this user is over
        self.history.add(click.user_id, click.item_id)  # evicts the same LRU user as below
        entry = self.users.get(click.user_id)
        if entry is None:
            self.users.put(click.user_id, [click.ts, now])
        else:
            entry[0] = max(entry[0], click.ts)
            entry[1] = now
            self.users.touch(click.user_id)
        return True

    def load(self, vectors: Iterable[UserVector], now: float, now_ms: int) -> None:
        """Rebuild from the latest vector per user (oldest first, so LRU order follows event time)."""
        for v in sorted(vectors, key=lambda v: v.event_ts):
            for item in v.recent_items[-self.history.max_len:]:
                self.history.add(v.user_id, item)
            # Activity is unknown after a move; event time stands in for it.
            evicted = self.users.put(v.user_id, [v.event_ts, now - max(0.0, (now_ms - v.event_ts) / 1000)])
            self.replay_floor[v.user_id] = v.event_ts
            if evicted is not None:  # forgotten: its replayed clicks count as new (bounded like users)
                self.replay_floor.pop(evicted, None)

    def active_since(self, since: float) -> list[str]:
        """Users active at or after ``since``, most recent first."""
        out = []
        for user_id in reversed(self.users):
            if self.users[user_id][1] < since:
                break
            out.append(user_id)
        return out


class PublisherHandler(HandlerBase):
    """Keeps user histories, publishes user vectors. Kafka-free: the role wires the edges.

    ``load_partitions(ps)`` returns the latest vector per user in each ``user-vectors`` partition
    of ``ps`` (one read of them all: a rebalance that moves several partitions waits once).
    """

    def __init__(self, replica: TowerReplica, sink: VectorSink,
                 load_partitions: Callable[[list[int]], Mapping[int, Iterable[UserVector]]], clicks_topic: str,
                 options: PublisherOptions = PublisherOptions(), metrics: PublisherMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION,
                 poll_updates: Callable[[], object] = lambda: None, side_flush: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 states: StateMetrics = STATE) -> None:
        self.replica = replica
        self.sink = sink
        self.load_partitions = load_partitions
        self.clicks_topic = clicks_topic
        self.options = options
        self.metrics = metrics or role_metrics(PublisherMetrics)
        self.state_metrics = states
        self.version_metrics = version_metrics
        self.poll_updates = poll_updates
        self.side_flush = side_flush
        self.clock = clock
        self.wall_ms = wall_ms
        self.states: dict[int, PartitionState] = {}
        self.loading: set[int] = set()
        self._dirty: dict[tuple[int, str], None] = {}      # users with clicks not yet published (ordered)
        self._fresh_published = False  # fresh clicks were published since the last tick
        self._dirty_since = 0.0
        self._refresh: dict[tuple[int, str], None] = {}    # users to re-publish at the current version
        self._scans: deque[tuple[ModelUpdate, deque[tuple[int, str]]]] = deque()  # deltas to check users against
        self._last_round = float("-inf")  # when the last re-publication round started (clock s)
        self._refresh_tokens = 0.0        # re-publications allowed now while clicks flow (a token bucket)
        self._last_tick = clock()
        self._round_due = False           # an update arrived since, within refresh_interval_s of it

    # --- partitions -------------------------------------------------------------------------
    def assigned(self, partitions: set[TopicPartition]) -> None:
        """Runs on the client's IO thread: only note the partitions; they are rebuilt in the main loop."""
        self.loading |= {tp.partition for tp in partitions if tp.topic == self.clicks_topic} - set(self.states)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions if tp.topic == self.clicks_topic}
        for p in gone:
            self.states.pop(p, None)
        self.loading -= gone
        self._dirty = {k: None for k in self._dirty if k[0] not in gone}
        self._refresh = {k: None for k in self._refresh if k[0] not in gone}
        self._gauges()

    def _load_pending(self) -> None:
        pending = sorted(self.loading)
        loaded = self.load_partitions(pending)
        for p in pending:
            state = PartitionState(self.replica.config.history_len, self.options.history_users)
            state.load(list(loaded.get(p, ())), self.clock(), self.wall_ms())
            self.states[p] = state
            self.loading.discard(p)
            log.info("clicks[%d]: rebuilt %d users from user-vectors[%d]", p, len(state.users), p)
        self._gauges()

    # --- the runtime's calls ------------------------------------------------------------------
    def handle(self, records: list[Record]) -> None:
        if self.loading:
            self._load_pending()
        now = self.clock()
        for r in records:
            state = self.states.get(r.partition)
            if state is None:  # records without an assignment callback (assign_all): start empty
                state = self.states[r.partition] = PartitionState(self.replica.config.history_len,
                                                                  self.options.history_users)
            if state.click(r.value, now):
                if not self._dirty:
                    self._dirty_since = now
                self._dirty[(r.partition, r.value.user_id)] = None
        if self._dirty and (self.options.flush_ms == 0 or len(self._dirty) >= self.options.flush_users
                            or now - self._dirty_since >= self.options.flush_ms / 1000):
            self._publish_dirty()

    def tick(self) -> None:
        self.poll_updates()
        if self._round_due and self.clock() - self._last_round >= self.options.refresh_interval_s:
            self._start_round(None, True)
        if self.loading:
            self._load_pending()
        if self._dirty and self.clock() - self._dirty_since >= self.options.flush_ms / 1000:
            self._publish_dirty()
        # Fresh clicks first: while they keep coming, re-publication after a model update is held
        # to refresh_per_s (a token bucket, so it is smooth: bursts of it after each round doubled
        # the click → vector p99), and goes at refresh_per_tick per loop once the clicks pause.
        now = self.clock()
        elapsed, self._last_tick = max(0.0, now - self._last_tick), now
        busy, self._fresh_published = self._fresh_published, False
        if not busy:
            self._refresh_some(self.options.refresh_per_tick)
            return
        burst = min(float(self.options.refresh_per_tick), max(1.0, self.options.refresh_per_s * REFRESH_BURST_S))
        self._refresh_tokens = min(burst, self._refresh_tokens + elapsed * self.options.refresh_per_s)
        if self._refresh_tokens >= 1.0 and (self._refresh or self._scans):
            self._refresh_tokens -= self._refresh_some(int(self._refresh_tokens))

    def flush(self, offsets: object) -> None:
        """Publish what is pending and wait until it is durable; a failed send blocks the commit."""
        self._publish_dirty()
        self.side_flush()
        failed = self.sink.flush()
        if failed:
            for key in failed:
                if key[0] in self.states:
                    self._dirty[key] = None
            raise TransientError(f"{len(failed)} user vectors could not be published")

    # --- model updates ----------------------------------------------------------------------
    def on_model_update(self, update: ModelUpdate, applied: Applied) -> None:
        """Queue the re-publishing of recently active users at the new version.

        The trainer publishes an update at every flush, so rounds are rate-limited: an update
        within ``refresh_interval_s`` of the last round only marks one due, and the round that
        ``tick`` starts later re-publishes every active user (the deltas it covers are merged).
        """
        self.version_metrics.version.labels(ROLE).set(self.replica.version)
        if self.clock() - self._last_round < self.options.refresh_interval_s:
            self._round_due = True
            return
        self._start_round(update, applied.reencode_all)

    def _start_round(self, update: ModelUpdate | None, everything: bool) -> None:
        self._last_round = self.clock()
        self._round_due = False
        since = self.clock() - self.options.refresh_active_s
        active = [(p, u) for p, st in self.states.items() for u in st.active_since(since)]
        if everything or update is None:
            self._scans.clear()
            self._refresh.update(dict.fromkeys(active))
        elif active:
            self._scans.append((update, deque(active)))
        self._gauges()

    def _refresh_some(self, budget: int) -> int:
        """Check and re-publish up to ``budget`` users; returns how many were re-published."""
        budget = max(1, budget)
        limit = budget
        while self._scans and budget > 0:
            update, candidates = self._scans[0]
            chunk = [candidates.popleft() for _ in range(min(budget, len(candidates)))]
            chunk = [(p, u) for p, u in chunk if p in self.states and u in self.states[p].users]
            histories = [self.states[p].history.get(u) for p, u in chunk]
            touched = set(self.replica.users_touched(update, [u for _, u in chunk], histories))
            self._refresh.update(dict.fromkeys((p, u) for p, u in chunk if u in touched))
            budget -= max(1, len(chunk))
            if not candidates:
                self._scans.popleft()
        published = 0
        if self._refresh:
            keys = list(itertools.islice(self._refresh, limit))
            for k in keys:
                del self._refresh[k]
            published = self._publish(keys, "model_update")
        if self._scans or self._refresh:
            self._gauges()
        return published

    # --- publishing -------------------------------------------------------------------------
    def _publish_dirty(self) -> None:
        if not self._dirty:
            return
        keys, self._dirty = list(self._dirty), {}
        self._fresh_published = True
        for k in keys:
            self._refresh.pop(k, None)  # published at the current version now
        size = self.options.flush_users
        for i in range(0, len(keys), size):
            self._publish(keys[i:i + size], "click")
        self._gauges()

    def _publish(self, keys: list[tuple[int, str]], cause: str) -> int:
        keys = [(p, u) for p, u in keys if p in self.states and u in self.states[p].users]
        if not keys:
            return 0
        histories = [self.states[p].history.get(u) for p, u in keys]
        vectors = self.replica.encode_users([u for _, u in keys], histories)
        published_at = self.wall_ms()
        version = self.replica.version
        for (p, user_id), history, vector in zip(keys, histories, vectors):
            event_ts = int(self.states[p].users[user_id][0])
            self.sink.send(UserVector(user_id=user_id, vector=vector.tolist(), model_version=version,
                                      event_ts=event_ts, published_at=published_at, recent_items=history), p)
            if cause == "click":
                self.metrics.click_to_vector.observe(max(0, published_at - event_ts) / 1000)
        self.metrics.published.labels(cause).inc(len(keys))
        return len(keys)

    def _gauges(self) -> None:
        users = sum(len(st.users) for st in self.states.values())
        self.metrics.users.set(users)
        self.state_metrics.fill(ROLE, "histories", users, self.options.history_users * len(self.states))
        self.metrics.pending_refresh.set(len(self._refresh) + sum(len(c) for _, c in self._scans))


class VectorTable:
    """Reads partitions of the compacted user-vectors topic: the latest vector per user in each."""

    def __init__(self, consumer: KafkaConsumer, topic: str, deadletters: DeadLetterSink, max_value_bytes: int,
                 timeout_s: float) -> None:
        self.consumer = consumer
        self.topic = topic
        self.deadletters = deadletters
        self.decode = user_vector_decoder(max_value_bytes)  # None: a tombstone deletes the user
        self.timeout_s = timeout_s

    def load(self, partitions: list[int]) -> dict[int, list[UserVector]]:
        latest: dict[int, dict[str, UserVector]] = {p: {} for p in partitions}

        def on_record(r: Record) -> None:
            if r.value is not None:
                latest[r.partition][r.value.user_id] = r.value
            elif r.key is not None:
                latest[r.partition].pop(r.key.decode("utf-8", "replace"), None)

        if not partitions:
            return {}
        reader = TopicReader(self.consumer, self.topic, "user-vectors", self.decode, on_record, self.deadletters,
                             partitions=partitions)
        reader.start()
        if not reader.catch_up(self.timeout_s):
            raise TransientError(f"could not read {self.topic}{partitions} to their end in {self.timeout_s:.0f}s")
        return {p: list(users.values()) for p, users in latest.items()}

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def run(settings: Settings, start: StartPosition) -> None:
    """Run the publisher until SIGTERM/SIGINT."""
    options = PublisherOptions.from_settings(settings)
    topics = settings.topics
    config = model_config(settings)
    replica = TowerReplica(config, settings.model_max_version_jump)
    with ExitStack() as stack:
        side_producer = make_producer(settings)
        stack.callback(side_producer.close, 10)
        side_deadletters = deadletter_sink(settings, ROLE, side_producer)
        vector_producer = make_producer(settings)
        stack.callback(vector_producer.close, 30)

        vectors = VectorTable(make_consumer(settings, None), topics.user_vectors, side_deadletters,
                              settings.max_value_bytes, options.rebuild_timeout_s)
        stack.callback(vectors.close)
        n_clicks = len(vectors.consumer.partitions_for_topic(topics.clicks) or ())
        n_vectors = len(vectors.consumer.partitions_for_topic(topics.user_vectors) or ())
        if n_clicks == 0 or n_clicks != n_vectors:
            raise ConfigError(f"{topics.clicks} has {n_clicks} partitions and {topics.user_vectors} {n_vectors}: "
                              "they must exist and match (a clicks partition's state lives in the same-numbered "
                              "user-vectors partition)")

        handler = PublisherHandler(replica, KafkaVectorSink(vector_producer, topics.user_vectors), vectors.load,
                                   topics.clicks, options, side_flush=lambda: side_deadletters.flush(30))
        feed = ModelUpdateFeed(make_consumer(settings, None), topics.model_updates, replica, side_deadletters,
                               on_applied=handler.on_model_update, max_bytes=update_max_bytes(settings, config),
                               signing_key=settings.model_signing_key)
        stack.callback(feed.close)
        handler.poll_updates = feed.poll
        feed.start(options.startup_timeout_s)
        handler.version_metrics.version.labels(ROLE).set(replica.version)
        log.info("publisher at model v%d", replica.version)
        run_handler(ROLE, settings, start, handler,
                    {topics.clicks: ("clicks", Decoder(Click, settings.max_value_bytes).decode)}, stack=stack)
