"""The publisher's handler: clicks and model updates in, user vectors out. Kafka-free."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Callable, Iterable, Mapping

from kafka import TopicPartition

from streamrecall.consumers.roles.publisher.metrics import PublisherMetrics
from streamrecall.consumers.roles.publisher.options import ROLE, PublisherOptions
from streamrecall.consumers.roles.publisher.sink import VectorSink
from streamrecall.consumers.roles.publisher.state import ActiveUsers, PartitionState
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.errors import TransientError
from streamrecall.events import UserVector
from streamrecall.metrics import MODEL_VERSION, STATE, ModelVersionMetrics, StateMetrics, role_metrics
from streamrecall.model import Applied, ModelUpdate, TowerReplica
from streamrecall.model.update import ChangedRows

log = logging.getLogger(__name__)


#: While clicks flow, re-publication never bursts more than this many seconds of its rate at once.
REFRESH_BURST_S = 0.1


class PublisherHandler(HandlerBase):
    """Keeps user histories, publishes user vectors. Kafka-free: the role wires the edges.

    ``load_partitions(ps)`` returns the latest vector per user in each ``user-vectors`` partition
    of ``ps`` (one read of them all: a rebalance that moves several partitions waits once).
    """

    def __init__(self, replica: TowerReplica, sink: VectorSink,
                 load_partitions: Callable[[list[int]], Mapping[int, Iterable[UserVector]]], clicks_topic: str,
                 options: PublisherOptions = PublisherOptions(), metrics: PublisherMetrics | None = None,
                 version_metrics: ModelVersionMetrics = MODEL_VERSION,
                 poll_updates: Callable[[], Iterable[tuple[ModelUpdate, Applied]]] = lambda: (),
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
        self.clock = clock
        self.wall_ms = wall_ms
        self.states: dict[int, PartitionState] = {}
        self.loading: set[int] = set()
        # Users with clicks not yet published (ordered), with their newest click's record timestamp
        # and poll time (wall ms) for the click-stage histogram; None after a failed send.
        self._dirty: dict[tuple[int, str], tuple[int, int] | None] = {}
        self._fresh_published = False  # fresh clicks were published since the last tick
        self._dirty_since = 0.0
        self._refresh: dict[tuple[int, str], None] = {}    # users to re-publish at the current version
        # An all-users round is in progress (_covering): its everything-scan (a _scans entry with no
        # rows) holds every active user it has not reached, and _since_round those published since
        # the last round started (at an older version once the next one starts), so that next round
        # queues only them.
        self._covering = False
        self._since_round: dict[tuple[int, str], None] = {}
        # Users to check against a delta's rows (None: every one of them is re-published), oldest round first.
        self._scans: deque[tuple[ChangedRows | None, ActiveUsers]] = deque()
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
        self._dirty = {k: t for k, t in self._dirty.items() if k[0] not in gone}
        self._refresh = {k: None for k in self._refresh if k[0] not in gone}
        self._since_round = {k: None for k in self._since_round if k[0] not in gone}
        self._gauges()

    def _load_pending(self) -> None:
        pending = sorted(self.loading)
        loaded = self.load_partitions(pending)
        for p in pending:
            state = PartitionState(self.replica.config.history_len, self.options.history_users)
            state.load(list(loaded.get(p, ())), self.clock(), self.wall_ms())
            self.states[p] = state
            self.loading.discard(p)
            self._covering = False  # its users are in no round yet: the next round scans everyone
            log.info("clicks[%d]: rebuilt %d users from user-vectors[%d]", p, len(state.users), p)
        self._gauges()

    # --- the runtime's calls ------------------------------------------------------------------
    def handle(self, records: list[Record]) -> None:
        if self.loading:
            self._load_pending()
        now, polled = self.clock(), self.wall_ms()
        for r in records:
            state = self.states.get(r.partition)
            if state is None:  # records without an assignment callback (assign_all): start empty
                state = self.states[r.partition] = PartitionState(self.replica.config.history_len,
                                                                  self.options.history_users)
            if state.click(r.value, now):
                if not self._dirty:
                    self._dirty_since = now
                key = (r.partition, r.value.user_id)
                if key not in self._dirty or state.users[r.value.user_id][0] == r.value.ts:
                    self._dirty[key] = (r.timestamp_ms, polled)  # the newest click times the stages
        if self._dirty and (self.options.flush_ms == 0 or len(self._dirty) >= self.options.flush_users
                            or now - self._dirty_since >= self.options.flush_ms / 1000):
            self._publish_dirty()

    def tick(self) -> None:
        for update, applied in self.poll_updates():
            self.on_model_update(update, applied)
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
        self._start_round(applied.changed, applied.reencode_all)

    def _start_round(self, update: ChangedRows | None, everything: bool) -> None:
        started = time.perf_counter()
        self._last_round = self.clock()
        self._round_due = False
        if self._covering:
            # The users the round in progress has not reached get the newest version when their
            # turn comes; only those published since the last round start are behind it now. Scanning
            # every active user instead took the loop 1.2 s at 800,000 users, every
            # refresh_interval_s, and held fresh clicks that long (issue 16: p99 2 s at 1M users).
            queued = len(self._since_round)
            self._refresh.update(self._since_round)
        else:
            active = ActiveUsers(self.states, self.clock() - self.options.refresh_active_s)
            queued = len(active)
            if everything or update is None:
                self._scans.clear()
                self._covering = bool(active) or bool(self._refresh)
                update = None
            if active:
                self._scans.append((update, active))
        self._since_round = {}
        self._gauges()
        took = time.perf_counter() - started
        if took >= 0.1:  # the loop, fresh clicks included, waited this long
            log.info("re-publication round: at most %d users queued in %.2fs", queued, took)

    def _refresh_some(self, budget: int) -> int:
        """Check and re-publish up to ``budget`` users; returns how many were re-published."""
        budget = max(1, budget)
        limit = budget
        while self._scans and budget > 0:
            update, candidates = self._scans[0]
            chunk = [(p, u) for p, u in candidates.take(budget) if p in self.states]
            if update is None:  # every user: but not again those published at this round's version or queued
                self._refresh.update(dict.fromkeys(k for k in chunk if k not in self._since_round
                                                   and k not in self._refresh))
            else:
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
        if published or self._scans or self._refresh:
            self._round_done()
            self._gauges()  # (down to 0 too: the pending gauge stayed at the last batch's size before)
        return published

    def _round_done(self) -> None:
        """Every user the rounds queued is published: the next round scans everyone again."""
        if not self._refresh and not self._scans:
            self._covering = False
            self._since_round = {}

    # --- publishing -------------------------------------------------------------------------
    def _publish_dirty(self) -> None:
        if not self._dirty:
            return
        pending, self._dirty = self._dirty, {}
        keys = list(pending)
        self._fresh_published = True
        for k in keys:
            self._refresh.pop(k, None)  # published at the current version now
        size = self.options.flush_users
        for i in range(0, len(keys), size):
            self._publish(keys[i:i + size], "click", pending)
        self._round_done()
        self._gauges()

    def _publish(self, keys: list[tuple[int, str]], cause: str,
                 polled: Mapping[tuple[int, str], tuple[int, int] | None] | None = None) -> int:
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
                timing = polled.get((p, user_id)) if polled else None
                if timing is not None:
                    self._observe_stages(event_ts, *timing, published_at)
        self.metrics.published.labels(cause).inc(len(keys))
        if self._covering:
            self._since_round.update(dict.fromkeys(keys))
        return len(keys)

    def _observe_stages(self, event_ts: int, record_ts: int, polled_ms: int, published_ms: int) -> None:
        stage = self.metrics.click_stage
        stage.labels("produce").observe(max(0, record_ts - event_ts) / 1000)
        stage.labels("deliver").observe(max(0, polled_ms - record_ts) / 1000)
        stage.labels("hold").observe(max(0, published_ms - polled_ms) / 1000)

    def _gauges(self) -> None:
        users = sum(len(st.users) for st in self.states.values())
        self.metrics.users.set(users)
        self.state_metrics.fill(ROLE, "histories", users, self.options.history_users * len(self.states))
        self.metrics.pending_refresh.set(len(self._refresh) + sum(len(c) for _, c in self._scans))
