"""`streamrecall evaluate`: prequential (test-then-train) evaluation of the live system.

The stream (JSONL items + clicks, or the synthetic one) is replayed in time order
through real role processes. After a warm-up share, it proceeds in chunks: before a
chunk is produced, recall is asked for every user in it; a click is a hit when its item
is in that user's top K. Items the user clicked before are excluded from every
candidate list, so re-clicks are not scored. Peers are computed in the same run on the
same chunks: most-popular-so-far, and the same system with the logQ correction off.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgspec

from streamrecall.broker import EmbeddedBroker
from streamrecall.errors import StreamrecallError
from streamrecall.harness import LocalSystem

log = logging.getLogger(__name__)

Event = tuple[str, str, dict[str, Any]]
HOUR_MS = 3_600_000
#: Largest k the indexer answers; candidate lists are over-fetched up to it to drop seen items.
MAX_FETCH = 1000


@dataclass
class Score:
    """Hit and recall counts of one recommender over the scored clicks."""

    hits: int = 0
    scored: int = 0
    tail_hits: int = 0
    tail_scored: int = 0
    cold_hits: int = 0
    cold_scored: int = 0
    recall_sum: float = 0.0
    recall_n: int = 0

    def as_dict(self, k: int) -> dict[str, Any]:
        ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731 - tiny local helper
        return {"k": k, "hr_at_k": ratio(self.hits, self.scored), "recall_at_k": ratio(self.recall_sum, self.recall_n),
                "tail_hr_at_k": ratio(self.tail_hits, self.tail_scored),
                "cold_start_hr_at_k": ratio(self.cold_hits, self.cold_scored),
                "scored_clicks": self.scored, "tail_clicks": self.tail_scored, "cold_start_clicks": self.cold_scored}


@dataclass
class Stream:
    events: list[Event]
    created_at: dict[str, int] = field(default_factory=dict)
    tail: set[str] = field(default_factory=set)  # items outside the 10% most clicked


def load_jsonl(items: Path, clicks: Path) -> list[Event]:
    """Read both files and merge them in event-time order (an item before clicks at the same ms)."""
    decode = msgspec.json.decode
    out: list[tuple[int, int, Event]] = []
    with open(items, "rb") as f:
        for line in f:
            if line.strip():
                v = decode(line)
                out.append((int(v["created_at"]), 0, ("items", v["item_id"], v)))
    with open(clicks, "rb") as f:
        for line in f:
            if line.strip():
                v = decode(line)
                out.append((int(v["ts"]), 1, ("clicks", v["user_id"], v)))
    out.sort(key=lambda t: (t[0], t[1]))
    return [e for _, _, e in out]


def prepare(events: Iterable[Event]) -> Stream:
    events = list(events)
    created = {key: int(v["created_at"]) for topic, key, v in events if topic == "items"}
    counts = Counter(v["item_id"] for topic, _, v in events if topic == "clicks")
    ranked = [i for i, _ in counts.most_common()]
    head = set(ranked[: max(1, len(ranked) // 10)])
    tail = set(created) - head
    return Stream(events, created, tail)


class PopularPeer:
    """Most clicked so far, minus what the user clicked before."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.deleted: set[str] = set()

    def observe(self, events: Iterable[Event]) -> None:
        for topic, _, v in events:
            if topic == "clicks":
                self.counts[v["item_id"]] += 1
            elif v.get("deleted"):
                self.deleted.add(v["item_id"])

    def top(self, k: int, seen: set[str]) -> list[str]:
        candidates = heapq.nlargest(k + len(seen) + len(self.deleted), self.counts.items(), key=lambda kv: kv[1])
        return [i for i, _ in candidates if i not in seen and i not in self.deleted][:k]


def score_chunk(score: Score, chunk: list[Event], tops: dict[str, list[str]], seen: dict[str, set[str]],
                stream: Stream) -> None:
    """Score the chunk's clicks against the top lists asked for before it was produced."""
    clicked: dict[str, set[str]] = defaultdict(set)
    for topic, _, v in chunk:
        if topic != "clicks":
            continue
        user, item = v["user_id"], v["item_id"]
        if item in seen.get(user, ()):  # excluded by design: re-clicks are not scored
            continue
        top = tops.get(user, [])
        hit = item in top
        score.scored += 1
        score.hits += hit
        if item in stream.tail:
            score.tail_scored += 1
            score.tail_hits += hit
        created = stream.created_at.get(item)
        if created is not None and 0 <= v["ts"] - created <= HOUR_MS:
            score.cold_scored += 1
            score.cold_hits += hit
        clicked[user].add(item)
    for user, items in clicked.items():
        top = set(tops.get(user, []))
        score.recall_sum += len(items & top) / len(items)
        score.recall_n += 1


def chunks(events: list[Event], warmup_share: float, n_chunks: int) -> tuple[list[Event], list[list[Event]]]:
    cut = int(len(events) * warmup_share)
    rest = events[cut:]
    size = max(1, -(-len(rest) // n_chunks))
    return events[:cut], [rest[i:i + size] for i in range(0, len(rest), size)]


def system_top(system: LocalSystem, user: str, k: int, seen: set[str]) -> list[str]:
    fetch = min(MAX_FETCH, k + len(seen))
    items, _ = system.recall(user, fetch, exclude_seen=True)
    return [i for i in items if i not in seen][:k]


def evaluate(events: list[Event], *, k: int, warmup_share: float, n_chunks: int, state_dir: Path,
             model: dict[str, Any], peers: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the prequential evaluation; returns the object `evaluate --json` prints."""
    stream = prepare(events)
    warmup, parts = chunks(stream.events, warmup_share, n_chunks)
    systems: dict[str, LocalSystem] = {}
    scores = {"system": Score(), "most_popular": Score(), "no_logq": Score()}
    popular = PopularPeer()
    seen: dict[str, set[str]] = defaultdict(set)
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(log_path=state_dir / "broker.log"))
        variants = {"system": {**model, "logq": True}}
        if peers:
            variants["no_logq"] = {**model, "logq": False}
        for name, m in variants.items():
            systems[name] = stack.enter_context(LocalSystem(state_dir / name, bootstrap_servers=broker.bootstrap_servers,
                                                            model=m, name=name.replace("_", "-")))
        for name, system in systems.items():
            if not system.wait_healthy(timeout_s):
                raise StreamrecallError(f"{name}: the indexer did not become healthy in {timeout_s:.0f}s")
        _feed(systems, warmup, popular, seen, timeout_s)
        for i, chunk in enumerate(parts):
            users = sorted({v["user_id"] for t, _, v in chunk if t == "clicks"})
            for name, system in systems.items():
                tops = {u: system_top(system, u, k, seen[u]) for u in users}
                score_chunk(scores[name], chunk, tops, seen, stream)
            if peers:
                tops = {u: popular.top(k, seen[u]) for u in users}
                score_chunk(scores["most_popular"], chunk, tops, seen, stream)
            _feed(systems, chunk, popular, seen, timeout_s)
            log.info("chunk %d/%d scored (%d users) after %.0fs", i + 1, len(parts), len(users),
                     time.monotonic() - started)
    out = scores["system"].as_dict(k)
    out["peers"] = {name: scores[name].as_dict(k) for name in ("most_popular", "no_logq") if peers}
    out["stream"] = {"events": len(stream.events), "warmup_events": len(warmup), "chunks": len(parts),
                     "seconds": round(time.monotonic() - started, 1)}
    return out


def _feed(systems: dict[str, LocalSystem], events: list[Event], popular: PopularPeer,
          seen: dict[str, set[str]], timeout_s: float) -> None:
    for system in systems.values():
        system.produce(events)
    popular.observe(events)
    for topic, _, v in events:
        if topic == "clicks":
            seen[v["user_id"]].add(v["item_id"])
    for name, system in systems.items():
        if not system.wait_caught_up(timeout_s):
            raise StreamrecallError(f"{name}: roles did not catch up within {timeout_s:.0f}s")


def synthetic_events(n_items: int, n_users: int, n_clicks: int, seed: int) -> Iterator[Event]:
    from streamrecall.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_items=n_items, n_users=n_users, n_clicks=n_clicks, seed=seed))


def format_table(result: dict[str, Any]) -> str:
    rows = [("streamrecall (logQ)", result)] + [(name, r) for name, r in result.get("peers", {}).items()]
    keys = ("hr_at_k", "recall_at_k", "tail_hr_at_k", "cold_start_hr_at_k", "scored_clicks")
    lines = [f"{'recommender':<22}" + "".join(f"{k:>20}" for k in keys)]
    for name, r in rows:
        lines.append(f"{name:<22}" + "".join(f"{'-' if r[k] is None else r[k]:>20}" for k in keys))
    lines.append(f"K = {result['k']}; stream: {result['stream']}")
    return "\n".join(lines)
