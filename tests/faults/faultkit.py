"""The fault-injection suite's kit: sizes, the workload and its ledger, the hostile corpus,
the outside-in invariant checks and the results table.

Everything is checked from outside the role processes: the indexer's HTTP API, the topics
read with plain consumers (user-vectors, model-updates, deadletter), the trainer's
checkpoint file. The ledger records what was produced, so the expected state (the live
items, the users with clicks, the bad records and who must refuse them) is computed, not
assumed.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec

from streamrecall.consumers.deadletter import (HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_ROLE,
                                               HEADER_TOPIC, headers_dict)
from streamrecall.consumers.update_chunks import HEADER_KIND, HEADER_VERSION
from streamrecall.devtools.harness import LocalSystem
from streamrecall.events import MAX_MILLIS
from streamrecall.model.safeio import read_layout
from streamrecall.devtools.synthetic import SyntheticConfig, generate

_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Scale:
    name: str
    items: int
    users: int
    clicks: int
    chunks: int              # the stream is produced in this many paced chunks
    chunk_pause_s: float     # pause between chunks (spreads kills over the stream)
    kills_per_role: int
    broker_pause_s: float
    hostile: int             # bad records (refused) in the hostile corpus
    hostile_valid: int       # odd-but-valid records (unknown ids, early clicks, duplicates, out of order)
    converge_s: float        # bound on catch-up after the last fault
    forged: int = 30         # forged model updates (unsigned, badly signed, tampered) with a signing key set
    up_kills: int = 1        # `streamrecall up` processes SIGKILLed


FULL = Scale("full", items=10_000, users=5_000, clicks=100_000, chunks=50, chunk_pause_s=2.0, kills_per_role=5,
             broker_pause_s=20.0, hostile=5_000, hostile_valid=1_000, converge_s=420.0, forged=300, up_kills=5)
REDUCED = Scale("reduced", items=800, users=300, clicks=3_000, chunks=8, chunk_pause_s=1.0, kills_per_role=1,
                broker_pause_s=5.0, hostile=300, hostile_valid=100, converge_s=180.0)


def scale() -> Scale:
    return FULL if os.environ.get("STREAMRECALL_FAULTS_SCALE", "reduced") == "full" else REDUCED


#: A small model so processes start fast; roles publish, checkpoint and snapshot often so that
#: kills land between durable points.
MODEL = {"id_buckets": 8192, "token_buckets": 8192, "estimator_buckets": 8192}
OPTIONS = {
    "trainer": {"batch_size": 256, "publish_every_steps": 10, "full_every_s": 3.0,
                "checkpoint_every_s": 2.0},
    "indexer": {"snapshot_interval_s": 2, "ef_construction": 64, "quality_interval_s": 60},
}
ROLES = ("trainer", "indexer", "publisher")


def command(test: str) -> str:
    return f"STREAMRECALL_FAULTS_SCALE={scale().name} .venv/bin/pytest tests/faults -q -k {test}"


# --------------------------------------------------------------------------- results
RESULTS: list[dict[str, Any]] = []


def record(fault: str, injected: int, checked: list[str], lost: str, test: str, **extra: Any) -> None:
    RESULTS.append({"fault": fault, "injected": injected, "checked": checked, "lost": lost,
                    "scale": scale().name, "command": command(test), **extra})


def results_markdown() -> str:
    lines = ["| fault | injected | checked | lost | reproduce |", "|---|---|---|---|---|"]
    for r in RESULTS:
        lines.append(f"| {r['fault']} | {r['injected']} | {'; '.join(r['checked'])} | {r['lost']} | "
                     f"`{r['command']}` |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- ledger
@dataclass(frozen=True)
class Bad:
    """One bad record, where it landed, and what each consuming role must do with it."""

    topic: str            # logical
    physical: str
    partition: int
    offset: int
    key: bytes | None
    reason: str | None    # expected dead-letter reason (None: any non-empty reason)
    must: frozenset[str]  # roles that must dead-letter it exactly once
    may: frozenset[str]   # roles that may dead-letter it at most once (read only on some paths)


@dataclass
class Ledger:
    """What was produced: the expected end state follows from it."""

    items: dict[str, bool] = field(default_factory=dict)      # item id → live (last event per id)
    user_max_ts: dict[str, int] = field(default_factory=dict)  # user → newest valid click ts
    clicks: int = 0
    item_events: int = 0
    bad: list[Bad] = field(default_factory=list)
    valid_odd: int = 0

    def note(self, topic: str, value: dict[str, Any]) -> None:
        if topic == "items":
            self.items[value["item_id"]] = not value.get("deleted", False)
            self.item_events += 1
        else:
            u = value["user_id"]
            self.user_max_ts[u] = max(self.user_max_ts.get(u, -1), value["ts"])
            self.clicks += 1

    @property
    def live(self) -> set[str]:
        return {i for i, alive in self.items.items() if alive}

    @property
    def gone(self) -> set[str]:
        return {i for i, alive in self.items.items() if not alive}


def produce_events(system: LocalSystem, ledger: Ledger, events: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
    events = list(events)
    for topic, _, value in events:
        ledger.note(topic, value)
    return system.produce(events)


def produce_bad(system: LocalSystem, ledger: Ledger, records: list[tuple[str, bytes | None, bytes | None, Any]],
                reasons: list[str] | None = None) -> None:
    """(logical topic, key, value, headers) → produced, each with its coordinates in the ledger;
    ``reasons`` (one per record) names the dead-letter reason expected where it is known."""
    topics = system.settings.topics
    physical = {"items": topics.items, "clicks": topics.clicks, "user-vectors": topics.user_vectors,
                "model-updates": topics.model_updates}
    sent = []
    for topic, key, value, headers in records:
        partition = 0 if topic == "model-updates" else None
        sent.append((topic, key, value, system.produce_raw(physical[topic], key, value, headers, partition)))
    system.flush()
    for i, (topic, key, value, future) in enumerate(sent):
        md = future.get(timeout=60)
        reason, must, may = expectation(topic, value)
        reason = reasons[i] if reasons is not None else reason
        ledger.bad.append(Bad(topic, physical[topic], md.partition, md.offset, key, reason, must, may))


def expectation(topic: str, value: bytes | None) -> tuple[str | None, frozenset[str], frozenset[str]]:
    """Which roles read a bad record on ``topic`` and must (or may) dead-letter it, and why."""
    if topic == "items":    # the trainer's table (re-read whole at every start) and the indexer
        must, may = {"trainer", "indexer"}, set()
    elif topic == "clicks":  # both groups
        must, may = {"trainer", "publisher"}, set()
    elif topic == "user-vectors":  # the indexer; the publisher only when it rebuilds that partition
        must, may = {"indexer"}, {"publisher"}
    else:                   # model-updates: the indexer; the publisher only if after its last-full start point
        must, may = {"indexer"}, {"publisher"}
    if topic == "model-updates":
        reason = None
    elif value is None:
        reason = "null"
    elif len(value) > (1 << 20):
        reason = "oversized"
    else:
        try:
            doc = json.loads(value, parse_constant=_refuse)
            reason = "future" if _stamped_ahead(doc) else "invalid"
        except (ValueError, UnicodeDecodeError):
            reason = "undecodable"
    return reason, frozenset(must), frozenset(may)


def _stamped_ahead(doc: Any) -> bool:
    """Whether an otherwise valid event names a time days ahead of now (and within the contract's range)."""
    if not isinstance(doc, dict):
        return False
    soon = time.time() * 1000 + 86_400_000
    return any(type(doc.get(f)) is int and soon < doc[f] <= MAX_MILLIS
               for f in ("ts", "created_at", "updated_at", "event_ts", "published_at"))


def _refuse(name: str) -> float:
    raise ValueError(name)  # NaN/Infinity literals are not JSON


# --------------------------------------------------------------------------- workload
def synthetic(s: Scale, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    cfg = SyntheticConfig(n_items=s.items, n_users=s.users, n_clicks=s.clicks, seed=seed, new_item_share=0.3,
                          update_share=0.1, delete_share=0.05, candidates=32)
    return list(generate(cfg))


def chunks(events: list[Any], n: int) -> list[list[Any]]:
    size = math.ceil(len(events) / n)
    return [events[i:i + size] for i in range(0, len(events), size)]


TS0 = 1_700_000_000_000


def hostile_bad(rng: random.Random, n: int, other_model_update: Callable[[], bytes]) -> list[tuple[str, bytes | None, bytes | None, Any]]:
    """``n`` records that break the contract, keyed ``bad-*`` so they are recognisable."""
    def j(v: Any) -> bytes:
        return json.dumps(v).encode()

    big = "x" * ((1 << 20) + 100)
    ahead = int(time.time() * 1000) + 30 * 86_400_000  # a month ahead: refused as "future"
    makers: list[tuple[str, Callable[[int], bytes | None]]] = [
        ("items", lambda i: b"{not json"),
        ("items", lambda i: b"\xff\xfe\x00garbage"),
        ("items", lambda i: b'{"item_id": "bad-%d", "created_at": NaN}' % i),
        ("items", lambda i: j({"item_id": f"bad-{i}"})),                                   # missing created_at
        ("items", lambda i: j({"item_id": i, "created_at": TS0})),                          # wrong type
        ("items", lambda i: j({"item_id": f"bad-{i}", "created_at": -5})),                  # out of range
        ("items", lambda i: j({"item_id": "", "created_at": TS0})),                         # empty id
        ("items", lambda i: b'{"item_id": "bad-%d", "created_at": 1, "features": {"p": 1e999}}' % i),  # inf
        ("items", lambda i: j({"item_id": f"bad-{i}", "created_at": TS0, "categories": "c1"})),
        ("items", lambda i: j([f"bad-{i}", TS0])),
        ("items", lambda i: j({"item_id": "y" * 300, "created_at": TS0})),                  # over-long id
        ("items", lambda i: None),                                                           # tombstone
        ("items", lambda i: j({"item_id": f"bad-{i}", "created_at": ahead})),
        ("items", lambda i: j({"item_id": f"bad-{i}", "created_at": TS0, "updated_at": ahead})),
        ("items", lambda i: j({"item_id": f"bad-{i}", "created_at": 2**63})),               # past year 9999
        ("clicks", lambda i: b"\x00\x01\x02"),
        ("clicks", lambda i: b'{"user_id": "bad-%d", "item_id": "i1", "ts": Infinity}' % i),
        ("clicks", lambda i: j({"user_id": f"bad-{i}", "item_id": "i1"})),                  # missing ts
        ("clicks", lambda i: j({"user_id": f"bad-{i}", "item_id": "i1", "ts": "yesterday"})),
        ("clicks", lambda i: j({"user_id": f"bad-{i}", "item_id": "i1", "ts": TS0, "weight": -1})),
        ("clicks", lambda i: b'{"user_id": "bad-%d", "item_id": "i1", "ts": 1, "weight": 1e999}' % i),
        ("clicks", lambda i: j({"user_id": None, "item_id": "i1", "ts": TS0})),
        ("clicks", lambda i: j("just a string")),
        ("clicks", lambda i: None),
        ("clicks", lambda i: j({"user_id": f"bad-{i}", "item_id": "i1", "ts": ahead})),
        ("clicks", lambda i: j({"user_id": f"bad-{i}", "item_id": "i1", "ts": 2**64 - 1})),
        ("user-vectors", lambda i: b'{"user_id": "bad-%d", "vector": [NaN, 1.0], "model_version": 1, '
                                   b'"event_ts": 1, "published_at": 1}' % i),
        ("user-vectors", lambda i: b'{"user_id": "bad-%d", "vector": [1e999, 1.0], "model_version": 1, '
                                   b'"event_ts": 1, "published_at": 1}' % i),
        ("user-vectors", lambda i: j({"user_id": f"bad-{i}", "vector": [], "model_version": 1, "event_ts": 1,
                                      "published_at": 1})),
        ("user-vectors", lambda i: j({"user_id": f"bad-{i}", "vector": "abc", "model_version": 1})),
        ("user-vectors", lambda i: j({"user_id": f"bad-{i}", "vector": [1.0], "model_version": 1, "event_ts": ahead,
                                      "published_at": 1})),
        ("model-updates", lambda i: b"\x80\x04\x95not-a-safetensors-payload"),
        ("model-updates", lambda i: struct.pack("<Q", 10**9) + b"{}"),
        ("model-updates", lambda i: struct.pack("<Q", 2) + b"{}"),
        ("model-updates", lambda i: None),
    ]
    out: list[tuple[str, bytes | None, bytes | None, Any]] = []
    rare = {"oversized": max(2, n // 500), "other-model": max(1, n // 1000)}
    for i in range(rare["oversized"]):
        topic = "items" if i % 2 == 0 else "clicks"
        out.append((topic, f"bad-big-{i}".encode(), j({"item_id": f"bad-big-{i}", "user_id": "bad", "ts": 1,
                                                       "created_at": 1, "title": big}), None))
    for i in range(rare["other-model"]):
        out.append(("model-updates", f"bad-model-{i}".encode(), other_model_update(),
                    [(HEADER_KIND, b"delta"), (HEADER_VERSION, b"1")]))
    while len(out) < n:
        i = len(out)
        topic, make = makers[rng.randrange(len(makers))]
        headers = None
        if topic == "model-updates" and rng.random() < 0.5:  # garbage that claims to be an update
            headers = [(HEADER_KIND, rng.choice([b"delta", b"full"])), (HEADER_VERSION, b"1")]
        out.append((topic, f"bad-{topic}-{i}".encode(), make(i), headers))
    rng.shuffle(out)
    return out


def forged_updates(rng: random.Random, n: int, key: str,
                   make_update: Callable[[int], bytes]) -> list[tuple[tuple[str, bytes | None, bytes | None, Any], str]]:
    """``n`` well-formed model updates that a replica with ``key`` must refuse, each with its expected
    reason: unsigned (one claims version 10^18), signed with another key, a genuine signature over
    bytes changed afterwards, and an empty signature. ``make_update(version)`` makes a payload."""
    from streamrecall.consumers.update_chunks import HEADER_SIGNATURE
    from streamrecall.consumers.update_codec import sign_update, update_headers
    from streamrecall.settings import Secret

    other = Secret("f" * 32)
    out = []
    for i in range(n):
        version = 10**18 if i % 4 == 0 else rng.randrange(1, 10**6)
        data = make_update(version)
        kind = "full"
        case = i % 4
        if case == 0:
            headers, reason = update_headers(kind, version, 10**6), "unsigned"
        elif case == 1:
            headers, reason = update_headers(kind, version, 10**6, sign_update(other, data)), "bad-signature"
        elif case == 2:
            headers = update_headers(kind, version, 10**6, sign_update(Secret(key), data))
            data, reason = data[:-1] + bytes([data[-1] ^ 0xFF]), "bad-signature"
        else:
            headers, reason = update_headers(kind, version, 10**6) + [(HEADER_SIGNATURE, b"")], "unsigned"
        out.append((("model-updates", f"forged-{i}".encode(), data, headers), reason))
    return out


def hostile_valid(rng: random.Random, n: int, ts_base: int,
                  content: dict[str, Any] | None = None) -> list[list[tuple[str, str, dict[str, Any]]]]:
    """Odd but valid events, in groups that must be produced in order: clicks on ids that never
    exist, clicks before their item, duplicates, out-of-order clicks and item events, delete then
    re-create. ``content`` is merged into the items that carry no title/categories/tags of their
    own (pass ``{}`` for items with no content at all, which the contract allows)."""
    extra = {"tags": ["odd"]} if content is None else content
    groups = []
    for g in range(n // 4):
        kind = g % 5
        u = f"odd-user-{g}"
        ts = ts_base + rng.randrange(1_000_000)
        if kind == 0:    # unknown item ids
            groups.append([("clicks", u, {"user_id": u, "item_id": f"ghost-{g}", "ts": ts})])
        elif kind == 1:  # a click before its item exists, then the item
            it = f"early-{g}"
            groups.append([("clicks", u, {"user_id": u, "item_id": it, "ts": ts}),
                           ("items", it, {"item_id": it, "created_at": ts + 5, "title": "early",
                                          "categories": ["odd"]})])
        elif kind == 2:  # duplicated click and item events
            it = f"dup-{g}"
            item = {"item_id": it, "created_at": ts, "tags": ["dup"]}
            click = {"user_id": u, "item_id": it, "ts": ts + 1}
            groups.append([("items", it, item), ("items", it, item), ("clicks", u, click), ("clicks", u, click)])
        elif kind == 3:  # out of order: newer then older events
            it = f"ooo-{g}"
            groups.append([("items", it, {"item_id": it, "created_at": ts + 100, **extra}),
                           ("items", it, {"item_id": it, "created_at": ts, **extra}),
                           ("clicks", u, {"user_id": u, "item_id": it, "ts": ts + 100}),
                           ("clicks", u, {"user_id": u, "item_id": it, "ts": ts})])
        else:            # delete, a duplicate delete, then re-create; and one left deleted
            it, gone = f"again-{g}", f"gone-{g}"
            groups.append([("items", it, {"item_id": it, "created_at": ts, **extra}),
                           ("items", it, {"item_id": it, "created_at": ts, "deleted": True}),
                           ("items", it, {"item_id": it, "created_at": ts, "deleted": True}),
                           ("items", it, {"item_id": it, "created_at": ts + 1, **extra}),
                           ("items", gone, {"item_id": gone, "created_at": ts, **extra}),
                           ("items", gone, {"item_id": gone, "created_at": ts, "deleted": True})])
    return groups


# --------------------------------------------------------------------------- reading
def read_topic(system: LocalSystem, topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every record of a physical topic, read to the fetch high watermark of each partition."""
    return system.read_topic(topic, timeout_s)


@dataclass(frozen=True)
class Checkpoint:
    steps: int
    version: int
    clicks_trained: int
    next_offsets: int       # sum over partitions
    estimator_step: int


def read_checkpoint(path: Path) -> Checkpoint | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    layout, header = read_layout(data)
    n = struct.unpack("<Q", data[:8])[0]
    entry = layout["estimator/step"]
    lo, _ = entry["data_offsets"]
    est_step = struct.unpack("<q", data[8 + n + lo:8 + n + lo + 8])[0]
    extra = header["extra"]
    return Checkpoint(int(header["steps"]), int(header["version"]), int(extra["clicks_trained"]),
                      sum(int(o) for o in extra["offsets"].get("clicks", {}).values()), int(est_step))


class CheckpointWatch:
    """Samples the trainer's checkpoint file; every checkpoint seen must be at least the previous."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[Checkpoint] = []
        self.backwards: list[tuple[Checkpoint, Checkpoint]] = []

    def sample(self) -> Checkpoint | None:
        cp = read_checkpoint(self.path)
        if cp is not None and (not self.seen or cp != self.seen[-1]):
            if self.seen:
                prev = self.seen[-1]
                if cp.steps < prev.steps or cp.estimator_step < prev.estimator_step \
                        or cp.clicks_trained < prev.clicks_trained or cp.version < prev.version:
                    self.backwards.append((prev, cp))
            self.seen.append(cp)
        return cp


# --------------------------------------------------------------------------- checks
class Checks:
    """Outside-in invariant checks; each returns a list of problems (empty: holds)."""

    def __init__(self, system: LocalSystem, ledger: Ledger) -> None:
        self.system = system
        self.ledger = ledger

    def index_exact(self, name: str = "indexer") -> list[str]:
        live, gone = self.ledger.live, self.ledger.gone
        status, health = self.system.get("/healthz", name)
        problems = []
        if status != 200:
            problems.append(f"{name} /healthz {status}: {health}")
            return problems
        with ThreadPoolExecutor(8) as pool:
            codes = dict(zip(sorted(live | gone), pool.map(lambda i: self.system.get(f"/items/{i}", name)[0],
                                                           sorted(live | gone))))
        missing = [i for i in live if codes[i] != 200]
        present = [i for i in gone if codes[i] != 404]
        if missing:
            problems.append(f"{len(missing)} live item(s) missing, e.g. {sorted(missing)[:5]}")
        if present:
            problems.append(f"{len(present)} deleted item(s) still served, e.g. {sorted(present)[:5]}")
        if health["items"] != len(live):
            problems.append(f"/healthz counts {health['items']} items, {len(live)} are live (extras or doubles)")
        return problems

    def user_vectors(self) -> list[str]:
        latest: dict[str, Any] = {}
        for m in read_topic(self.system, self.system.settings.topics.user_vectors):
            if m.key is None or m.key.startswith(b"bad-"):
                continue
            latest[m.key.decode()] = None if m.value is None else json.loads(m.value)
        problems = []
        missing = [u for u in self.ledger.user_max_ts if latest.get(u) is None]
        stale = [u for u, ts in self.ledger.user_max_ts.items()
                 if latest.get(u) is not None and latest[u]["event_ts"] != ts]
        extra = [u for u in latest if u not in self.ledger.user_max_ts]
        if missing:
            problems.append(f"{len(missing)} user(s) with clicks have no vector, e.g. {sorted(missing)[:5]}")
        if stale:
            u = sorted(stale)[0]
            problems.append(f"{len(stale)} user vector(s) do not cover the user's newest click, e.g. {u}: "
                            f"event_ts {latest[u]['event_ts']} != {self.ledger.user_max_ts[u]}")
        if extra:
            problems.append(f"{len(extra)} vector(s) for users without valid clicks, e.g. {sorted(extra)[:5]}")
        return problems

    def deadletters(self) -> tuple[list[str], Counter]:
        """Every dead letter is a bad record we produced, sent once per role that must refuse it."""
        by_source = {(b.physical, b.partition, b.offset): b for b in self.ledger.bad}
        seen: Counter = Counter()
        problems = []
        for m in read_topic(self.system, self.system.settings.topics.deadletter):
            h = headers_dict(m.headers)
            source = (h.get(HEADER_TOPIC), int(h.get(HEADER_PARTITION, -1)), int(h.get(HEADER_OFFSET, -1)))
            role = h.get(HEADER_ROLE, "?")
            bad = by_source.get(source)
            if bad is None:
                problems.append(f"dead letter for a record that was not bad: {source} by {role} "
                                f"({h.get(HEADER_REASON)}: {h.get('streamrecall.error', '')[:200]})")
                continue
            if role not in bad.must | bad.may:
                problems.append(f"{role} dead-lettered {source}, which it does not read")
            if bad.reason is not None and h.get(HEADER_REASON) != bad.reason:
                problems.append(f"{source} dead-lettered as {h.get(HEADER_REASON)!r}, expected {bad.reason!r}")
            if not h.get(HEADER_REASON) or not h.get("streamrecall.error"):
                problems.append(f"{source} dead-lettered without a reason or error")
            if m.key != bad.key:
                problems.append(f"{source} dead-lettered with key {m.key!r}, produced with {bad.key!r}")
            seen[(source, role)] += 1
        twice = [k for k, n in seen.items() if n > 1]
        if twice:
            problems.append(f"{len(twice)} record(s) dead-lettered more than once by one role, e.g. {twice[:3]}")
        missing = [(b.topic, b.partition, b.offset, r) for b in self.ledger.bad for r in b.must
                   if seen[((b.physical, b.partition, b.offset), r)] == 0]
        if missing:
            problems.append(f"{len(missing)} bad record(s) never dead-lettered, e.g. {missing[:5]}")
        per_role = Counter(role for (_, role) in seen.elements())
        return problems, per_role

    def model_updates(self, restarts: list[tuple[int, Checkpoint | None]]) -> list[str]:
        """Versions only grow; after each trainer restart (model-updates offset, checkpoint at the
        kill) every update is at least at the checkpoint's steps."""
        bad = {(b.physical, b.partition, b.offset) for b in self.ledger.bad}
        updates = []
        for m in read_topic(self.system, self.system.settings.topics.model_updates):
            if (m.topic, m.partition, m.offset) in bad:
                continue
            _, header = read_layout(m.value)
            updates.append((m.offset, int(header["version"]), int(header["steps"])))
        problems = []
        versions = [v for _, v, _ in updates]
        if versions != sorted(set(versions)):
            problems.append(f"model-update versions are not strictly increasing: {versions[:50]}")
        for at, cp in restarts:
            if cp is None:
                continue
            low = [(o, v, s) for o, v, s in updates if o >= at and s < cp.steps]
            if low:
                problems.append(f"after the restart at model-updates@{at} update(s) went below the checkpoint's "
                                f"{cp.steps} steps: {low[:3]}")
        return problems


def wait_until(what: str, check: Callable[[], list[str]], timeout_s: float, every_s: float = 2.0) -> list[str]:
    """Poll ``check`` until it reports no problem (effects are eventually consistent) or the
    timeout passes; returns the last problems (empty: it held)."""
    deadline = time.monotonic() + timeout_s
    problems = ["not checked"]
    while time.monotonic() < deadline:
        try:
            problems = check()
        except (OSError, AssertionError, KeyError) as exc:
            problems = [f"{what}: {type(exc).__name__}: {exc}"]
        if not problems:
            return []
        time.sleep(every_s)
    return problems


def log_tail(system: LocalSystem, name: str, n: int = 3000) -> str:
    path = system.state_dir / "logs" / f"{name}.log"
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def user_counts(ledger: Ledger) -> dict[str, int]:
    return {"items": len(ledger.items), "live": len(ledger.live), "users": len(ledger.user_max_ts),
            "clicks": ledger.clicks, "bad": len(ledger.bad)}


def per_topic(bad: list[Bad]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for b in bad:
        out[b.topic] += 1
    return dict(out)
