"""`streamrecall evaluate`: prequential (test-then-train) evaluation of the live system.

The stream (JSONL items + clicks, or the synthetic one) is replayed in time order
through real role processes. After a warm-up share, it proceeds in chunks: before a
chunk is produced, recall is asked for every user in it; a click is a hit when its item
is in that user's top K. Items the user clicked before are excluded from every
candidate list, so re-clicks are not scored. Peers are computed in the same run on the
same chunks: "model offline" (the same model config trained in this process on the same
clicks in the same order, scored by exact search at the same points — the ceiling the live
system should reach), the other model family trained the same way (``fm_offline`` when the system
runs the two towers, ``two_tower_offline`` when it runs the FM), item-to-item co-occurrence over each user's last clicks (item-CF),
most-popular so far, most-popular over the last clicks, and the same live system with the
logQ correction off. ``serving_skew`` is the live system's HR over the offline model's.

Head and tail are defined from click counts *before* each chunk, never the stream's future:
the head is the 10% most clicked live items so far. Each recommender also reports HR by
popularity decile, catalog coverage@K and the share of its slots that went to the head.

Every recommender is asked for enough candidates that dropping the items the user clicked
before still leaves K, so no list shrinks after the fact.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgspec

from streamrecall.devtools.broker import EmbeddedBroker
from streamrecall.devtools.harness import LocalSystem
from streamrecall.devtools.peers import (HOUR_MS, RECENT_WINDOW, TOWERS, Event, ItemCFPeer, OfflinePeer, Popularity,
                                         PopularPeer, RecentPopularPeer)
from streamrecall.errors import StreamrecallError
from streamrecall.ops.progress import track

log = logging.getLogger(__name__)


#: Largest k the indexer answers; candidate lists are over-fetched up to it to drop seen items.
MAX_FETCH = 1000


#: The peers, in the order tables show them; no_logq is a second live system (skipped by --no-peers).
PEERS = ("model_offline", "two_tower_offline", "fm_offline", "item_cf", "most_popular", "recent_popular", "no_logq")


@dataclass
class Score:
    """Hit and recall counts of one recommender over the scored clicks, and where its slots went."""

    hits: int = 0
    scored: int = 0
    tail_hits: int = 0
    tail_scored: int = 0
    cold_hits: int = 0
    cold_scored: int = 0
    recall_sum: float = 0.0
    recall_n: int = 0
    decile_hits: list[int] = field(default_factory=lambda: [0] * 10)
    decile_scored: list[int] = field(default_factory=lambda: [0] * 10)
    recommended: set[str] = field(default_factory=set)  # every item that filled a slot
    slots: int = 0
    head_slots: int = 0
    catalog_size: int = 0  # live items at the last chunk (the denominator of coverage)
    chunk_hr: list[float | None] = field(default_factory=list)  # HR@K of each scored chunk, in order

    def as_dict(self, k: int) -> dict[str, Any]:
        ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731 - tiny local helper
        return {"k": k, "hr_at_k": ratio(self.hits, self.scored), "recall_at_k": ratio(self.recall_sum, self.recall_n),
                "tail_hr_at_k": ratio(self.tail_hits, self.tail_scored),
                "cold_start_hr_at_k": ratio(self.cold_hits, self.cold_scored),
                "hr_by_popularity_decile": [ratio(h, n) for h, n in zip(self.decile_hits, self.decile_scored)],
                "coverage_at_k": ratio(len(self.recommended), self.catalog_size),
                "head_slot_share": ratio(self.head_slots, self.slots),
                "scored_clicks": self.scored, "tail_clicks": self.tail_scored, "cold_start_clicks": self.cold_scored,
                "hr_by_chunk": list(self.chunk_hr)}


@dataclass
class Stream:
    events: list[Event]
    created_at: dict[str, int] = field(default_factory=dict)


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
    return Stream(events, created)


def score_chunk(score: Score, chunk: list[Event], tops: dict[str, list[str]], seen: dict[str, set[str]],
                stream: Stream, popularity: Popularity) -> None:
    """Score the chunk's clicks against the top lists asked for before it was produced; head, tail
    and deciles come from the click counts before the chunk (``popularity``)."""
    clicked: dict[str, set[str]] = defaultdict(set)
    hits_before, scored_before = score.hits, score.scored
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
        if item not in popularity.head:
            score.tail_scored += 1
            score.tail_hits += hit
        decile = popularity.decile.get(item, 9)  # not created yet or unknown: the tail end
        score.decile_scored[decile] += 1
        score.decile_hits[decile] += hit
        created = stream.created_at.get(item)
        if created is not None and 0 <= v["ts"] - created <= HOUR_MS:
            score.cold_scored += 1
            score.cold_hits += hit
        clicked[user].add(item)
    for user, items in clicked.items():
        top_list = tops.get(user, [])
        top = set(top_list)
        score.recall_sum += len(items & top) / len(items)
        score.recall_n += 1
        score.recommended |= top
        score.slots += len(top_list)
        score.head_slots += sum(1 for i in top_list if i in popularity.head)
    score.catalog_size = popularity.live
    scored = score.scored - scored_before
    score.chunk_hr.append(round((score.hits - hits_before) / scored, 4) if scored else None)


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
             model: dict[str, Any], peers: bool = True, timeout_s: float = 600.0,
             options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the prequential evaluation; returns the object `evaluate --json` prints.

    ``options`` are role tables of the settings file (``{"trainer": {...}}``) for the live roles;
    the offline model trains in the trainer's batch size.
    """
    from streamrecall.consumers.roles.trainer.options import TrainerOptions
    from streamrecall.model import ModelConfig

    options = options or {}
    batch_size = int(options.get("trainer", {}).get("batch_size", TrainerOptions().batch_size))
    stream = prepare(events)
    warmup, parts = chunks(stream.events, warmup_share, n_chunks)
    systems: dict[str, LocalSystem] = {}
    scores = {name: Score() for name in ("system", *PEERS)}
    popular = PopularPeer()
    recent = RecentPopularPeer(RECENT_WINDOW)
    item_cf = ItemCFPeer()
    offline = OfflinePeer({**model, "logq": True}, batch_size)
    system_tower = ModelConfig(**model).tower
    families = {f"{t}_offline": OfflinePeer({**model, "logq": True, "tower": t, "temperature": None}, batch_size)
                for t in TOWERS if t != system_tower}  # the other model-recall family, at its own τ
    local = [popular, recent, item_cf, offline, *families.values()]
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
                                                            model=m, name=name.replace("_", "-"), options=options))
        for name, system in systems.items():
            if not system.wait_healthy(timeout_s):
                raise StreamrecallError(f"{name}: the indexer did not become healthy in {timeout_s:.0f}s")
        _feed(systems, warmup, local, seen, timeout_s)
        for i, chunk in enumerate(track(parts, len(parts), "evaluate", "chunks")):
            users = sorted({v["user_id"] for t, _, v in chunk if t == "clicks"})
            pop = popular.popularity()
            for name, system in systems.items():
                tops = {u: system_top(system, u, k, seen[u]) for u in users}
                score_chunk(scores[name], chunk, tops, seen, stream, pop)
            local_tops = {"model_offline": offline.tops(users, k, seen),
                          **{name: peer.tops(users, k, seen) for name, peer in families.items()},
                          "most_popular": {u: popular.top(k, seen[u]) for u in users},
                          "recent_popular": {u: recent.top(k, seen[u]) for u in users},
                          "item_cf": {u: item_cf.top(u, k, seen[u]) for u in users}}
            for name, tops in local_tops.items():
                score_chunk(scores[name], chunk, tops, seen, stream, pop)
            _feed(systems, chunk, local, seen, timeout_s)
            log.info("chunk %d/%d scored (%d users) after %.0fs", i + 1, len(parts), len(users),
                     time.monotonic() - started)
    out = scores["system"].as_dict(k)
    ran = {"model_offline", *families, "item_cf", "most_popular", "recent_popular", *(("no_logq",) if peers else ())}
    out["peers"] = {name: scores[name].as_dict(k) for name in PEERS if name in ran}
    offline_hr = out["peers"]["model_offline"]["hr_at_k"]
    out["serving_skew"] = round(out["hr_at_k"] / offline_hr, 4) if out["hr_at_k"] is not None and offline_hr else None
    out["stream"] = {"events": len(stream.events), "warmup_events": len(warmup), "chunks": len(parts),
                     "seconds": round(time.monotonic() - started, 1)}
    return out


def _feed(systems: dict[str, LocalSystem], events: list[Event], peers: list[Any],
          seen: dict[str, set[str]], timeout_s: float) -> None:
    for system in systems.values():
        system.produce(events)
    for peer in peers:
        peer.observe(events)
    for topic, _, v in events:
        if topic == "clicks":
            seen[v["user_id"]].add(v["item_id"])
    for name, system in systems.items():
        if not system.wait_caught_up(timeout_s):
            raise StreamrecallError(f"{name}: roles did not catch up within {timeout_s:.0f}s")


def parse_options(pairs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["trainer.batch_size=256", "model.logq=false", "model.tower=fm"]`` →
    ``{"trainer": {"batch_size": 256}, "model": {"logq": False, "tower": "fm"}}``."""
    tables: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        table, dot, key = name.strip().partition(".")
        if not sep or not dot or not table or not key:
            raise StreamrecallError(f"option {pair!r}: expected TABLE.KEY=VALUE, e.g. trainer.batch_size=256")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:  # a choice such as model.tower=fm; the roles' settings check it
                    if not value.isidentifier():
                        raise StreamrecallError(f"option {pair!r}: the value must be a number, true/false "
                                                "or a name such as fm") from None
        tables.setdefault(table, {})[key] = value
    return tables


def synthetic_events(n_items: int, n_users: int, n_clicks: int, seed: int) -> Iterator[Event]:
    from streamrecall.devtools.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_items=n_items, n_users=n_users, n_clicks=n_clicks, seed=seed))


def format_table(result: dict[str, Any]) -> str:
    rows = [("streamrecall (logQ)", result)] + [(name, r) for name, r in result.get("peers", {}).items()]
    keys = ("hr_at_k", "recall_at_k", "tail_hr_at_k", "cold_start_hr_at_k", "coverage_at_k", "head_slot_share",
            "scored_clicks")
    lines = [f"{'recommender':<22}" + "".join(f"{k:>19}" for k in keys)]
    for name, r in rows:
        lines.append(f"{name:<22}" + "".join(f"{'-' if r[k] is None else r[k]:>19}" for k in keys))
    lines.append("HR@K by popularity decile before each chunk (0: the most clicked tenth):")
    for name, r in rows:
        lines.append(f"  {name:<20}" + " ".join("    -" if h is None else f"{h:5.3f}" for h in r["hr_by_popularity_decile"]))
    lines.append(f"serving_skew (live HR / model offline HR) = {result.get('serving_skew')}")
    lines.append(f"K = {result['k']}; stream: {result['stream']}")
    return "\n".join(lines)
