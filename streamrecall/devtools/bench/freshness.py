"""`streamrecall bench freshness`: event → effect delays, measured from outside the processes.

Phases (``--phases``, default all):

- ``items``: items produced at ``--item-rate``/s for ``--seconds`` while ``--query-rate``
  POST /recall queries/s (k=100) run against the indexer; freshness is produce time →
  the first ``GET /items/{id}`` that answers 200, polled for a sample of the items.
- ``indexing``: a backlog of items produced at once; the indexer's items/s until all are
  searchable, as a ratio to raw ``hnswlib.Index.add_items`` of the same items' vectors
  (encoded by the same item tower) measured in this run.
- ``clicks``: clicks produced at ``--click-rate``/s for ``--seconds`` through trainer and
  publisher; freshness is the click's event time → the first vector of its user covering it,
  read back from the ``user-vectors`` topic by a plain consumer (re-publications after a model
  update carry an older click's event time and are counted apart).
- ``model``: clicks at ``--model-click-rate``/s through all three roles; freshness is the
  click's event time → the first moment the indexer serves a model trained on it (its
  ``/healthz`` ``model_trained_through_ms``, polled every 50 ms, reaches the click's time).
- ``trainer``: a backlog of clicks; the trainer's clicks/s from Kafka until its lag is zero,
  as a ratio to raw kafka-python consumption of the same topic in this run.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import threading
import time
from collections import deque
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import msgspec
import numpy as np
from kafka import TopicPartition

from streamrecall.devtools.bench import Result, json_option, plots, report, result
from streamrecall.devtools.bench.plots import plot_option
from streamrecall.consumers.clients import make_consumer
from streamrecall.devtools.harness import LocalSystem
from streamrecall.ops.progress import bar, track
from streamrecall.ops.status import group_lags, high_watermarks, indexer_health

MODEL = {"id_buckets": 1 << 17, "estimator_buckets": 1 << 17}
#: The clicks phase also reports latencies without its first seconds (the first full model
#: update re-publishes every active user while the roles warm up).
WARMUP_S = 10.0


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    arr = np.asarray(values)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _item(i: int, now_ms: int, rng: random.Random) -> dict[str, Any]:
    cat = f"cat{rng.randrange(40)}"
    return {"item_id": f"fresh-{i}", "created_at": now_ms, "title": f"{cat} word{rng.randrange(500)}",
            "categories": [cat], "tags": [f"tag{rng.randrange(400)}" for _ in range(3)],
            "features": {"price": round(rng.random() * 100, 2)}}


def _status(url: str, body: bytes | None = None, timeout_s: float = 2.0) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class _Paced:
    """Calls ``fn(i)`` ``rate`` times a second for ``seconds`` (on the caller's thread); with a
    ``desc``, a progress bar of the seconds elapsed (on a terminal only)."""

    def __init__(self, rate: float, seconds: float, desc: str = "") -> None:
        self.rate, self.seconds, self.desc = rate, seconds, desc

    def run(self, fn: Any, stop: threading.Event | None = None) -> int:
        started = time.monotonic()
        i = shown = 0
        with bar(int(self.seconds), self.desc, "s") if self.desc else contextlib.nullcontext() as b:
            while time.monotonic() - started < self.seconds and not (stop and stop.is_set()):
                fn(i)
                i += 1
                ahead = i / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
                if b is not None and int(time.monotonic() - started) > shown:
                    b.update(int(time.monotonic() - started) - shown)
                    shown = int(time.monotonic() - started)
        return i


def items_phase(system: LocalSystem, item_rate: float, query_rate: float, seconds: float,
                sample_every: int, samples: dict[str, Any]) -> list[Result]:
    api = system.api()
    produced_at: dict[str, float] = {}
    latencies: list[float] = []
    query_latencies: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()
    rng = random.Random(1)
    topic = system.settings.topics.items  # type: ignore[union-attr]

    def produce(i: int) -> None:
        value = _item(i, int(time.time() * 1000), rng)
        system.produce_raw(topic, value["item_id"].encode(), msgspec.json.encode(value))
        if i % sample_every == 0:
            with lock:
                produced_at[value["item_id"]] = time.monotonic()

    def poll() -> None:
        while not stop.is_set() or produced_at:
            with lock:
                pending = list(produced_at.items())
            if not pending:
                time.sleep(0.005)
                continue
            for item_id, t0 in pending:
                if _status(f"{api}/items/{item_id}") == 200:
                    latencies.append(time.monotonic() - t0)
                    with lock:
                        produced_at.pop(item_id, None)
                elif time.monotonic() - t0 > 60:
                    with lock:
                        produced_at.pop(item_id, None)  # counted as missing below
            time.sleep(0.002)

    def query(i: int) -> None:
        vec = np.random.default_rng(i).standard_normal(system_dim(system)).astype(float)
        body = json.dumps({"vector": (vec / np.linalg.norm(vec)).tolist(), "k": 100}).encode()
        t0 = time.perf_counter()
        if _status(f"{api}/recall", body) == 200:
            query_latencies.append(time.perf_counter() - t0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    querier = threading.Thread(target=lambda: _Paced(query_rate, seconds).run(query, stop), daemon=True)
    querier.start()
    n = _Paced(item_rate, seconds, "items phase").run(produce)  # the producer's linger (5 ms) sends as we go
    system.flush()
    stop.set()
    poller.join(timeout=90)
    querier.join(timeout=10)
    sampled = (n + sample_every - 1) // sample_every
    samples["item produced → searchable"] = latencies
    p50, p99 = percentiles(latencies)
    q50, q99 = percentiles(query_latencies)
    return [
        result("item produced → GET /items 200, p50", "s", p50, extra=f"{len(latencies)}/{sampled} sampled items"),
        result("item produced → GET /items 200, p99", "s", p99, extra=f"{n} items at {item_rate:g}/s"),
        result("items never searchable within 60 s", "items", sampled - len(latencies)),
        result("query k=100 under ingest, p50", "s", q50, extra=f"{len(query_latencies)} queries at {query_rate:g}/s"),
        result("query k=100 under ingest, p99", "s", q99),
    ]


def wait_assigned(system: LocalSystem, names: list[str], timeout_s: float = 120.0) -> None:
    """Wait until each role process has its partitions (a new group takes seconds to form on
    Tansu): a measurement must not include the join."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        proc = system.processes[name]
        url = system.api(name, admin=proc.role == "indexer") + "/metrics"  # the indexer's is on its admin port
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    text = r.read().decode()
                if any(line.startswith("streamrecall_rebalances_total") and 'kind="assigned"' in line
                       and not line.endswith(" 0.0") for line in text.splitlines()):
                    break
            except OSError:
                pass
            time.sleep(0.2)


def system_dim(system: LocalSystem) -> int:
    return int(MODEL.get("dim", 64))


def indexing_phase(system: LocalSystem, n: int) -> list[Result]:
    import hnswlib

    from streamrecall.events import Item
    from streamrecall.model.config import ModelConfig
    from streamrecall.model.replica import TowerReplica

    rng = random.Random(2)
    now = int(time.time() * 1000)
    values = [_item(10_000_000 + i, now, rng) for i in range(n)]
    before = int(system.get("/healthz")[1].get("items", 0))
    started = time.monotonic()
    topic = system.settings.topics.items  # type: ignore[union-attr]
    for v in track(values, len(values), "indexing backlog"):
        system.produce_raw(topic, v["item_id"].encode(), msgspec.json.encode(v))
    system.flush()
    while time.monotonic() - started < 600:
        if int(system.get("/healthz")[1].get("items", 0)) >= before + n:
            break
        time.sleep(0.05)
    ours = n / (time.monotonic() - started)
    # Raw: the same items' vectors, from the same (untrained) item tower, into a bare hnswlib index.
    replica = TowerReplica(ModelConfig(**MODEL))
    items = [msgspec.convert(v, Item) for v in values]
    vectors = replica.encode_items(items)
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=n, M=16, ef_construction=200)
    t0 = time.perf_counter()
    index.add_items(vectors, np.arange(n), num_threads=1)  # the indexer's index inserts on one thread
    raw = n / (time.perf_counter() - t0)
    return [
        result("indexer items/s from Kafka (encode + upsert)", "items/s", ours, ratio_to_raw=ours / raw,
               extra=f"backlog of {n} items; raw = hnswlib add_items of the same vectors on 1 thread, "
                     "as the indexer's (ours adds Kafka, decoding and the item tower)"),
        result("raw hnswlib add_items, 1 thread", "items/s", raw),
    ]


def clicks_phase(system: LocalSystem, click_rate: float, seconds: float, n_users: int, n_items: int,
                 samples: dict[str, Any]) -> list[Result]:
    """Every click's event time → the first vector of its user that covers it (event_ts ≥ the click's).

    Each click is counted once, by the first vector that covers it, so a vector that covers
    several clicks of its user counts all of them (the older ones waited longest); clicks that
    no vector covers within the run (+3 s) are reported as missing, not dropped."""
    settings = system.settings
    assert settings is not None
    latencies: list[float] = []
    seen_at: list[float] = []  # seconds since the clicks started, per latency
    refreshed = [0]
    pending: dict[str, deque[int]] = {}  # user → event times of produced clicks not yet covered
    lock = threading.Lock()
    started = time.monotonic()
    stop = threading.Event()
    reader_ready = threading.Event()

    def read() -> None:
        c = make_consumer(settings, None)
        tps = [TopicPartition(settings.topics.user_vectors, p)
               for p in c.partitions_for_topic(settings.topics.user_vectors)]
        c.assign(tps)
        c.seek_to_end(*tps)
        reader_ready.set()
        while not stop.is_set():
            for msgs in c.poll(timeout_ms=50).values():
                now_ms = time.time() * 1000
                at = time.monotonic() - started
                for m in msgs:
                    v = msgspec.json.decode(m.value)
                    with lock:
                        waiting = pending.get(v["user_id"])
                        covered = 0
                        while waiting and waiting[0] <= v["event_ts"]:
                            latencies.append((now_ms - waiting.popleft()) / 1000.0)
                            seen_at.append(at)
                            covered += 1
                    # Re-publications after a model update cover no new click; counted apart.
                    if not covered:
                        refreshed[0] += 1
        c.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader_ready.wait(30)
    rng = random.Random(3)
    topic = settings.topics.clicks

    def produce(i: int) -> None:
        user = f"bench-user-{rng.randrange(n_users)}"
        ts = int(time.time() * 1000)
        with lock:
            pending.setdefault(user, deque()).append(ts)
        value = {"user_id": user, "item_id": f"fresh-{rng.randrange(n_items)}", "ts": ts}
        system.produce_raw(topic, user.encode(), msgspec.json.encode(value))

    n = _Paced(click_rate, seconds, "clicks phase").run(produce)
    system.flush()
    deadline = time.monotonic() + 3  # let the last micro-batches come back
    while time.monotonic() < deadline and any(pending.values()):
        time.sleep(0.1)
    stop.set()
    reader.join(timeout=10)
    missing = sum(len(q) for q in pending.values())
    samples["click produced → user vector"] = latencies
    samples["click → user vector, seen at"] = seen_at
    p50, p99 = percentiles(latencies)
    steady = [lat for lat, at in zip(latencies, seen_at) if at >= WARMUP_S]
    s50, s99 = percentiles(steady)
    return [
        result(f"click produced → user vector, after the first {WARMUP_S:.0f} s, p50", "s", s50,
               extra="steady state: the first full model update and the group start excluded"),
        result(f"click produced → user vector, after the first {WARMUP_S:.0f} s, p99", "s", s99,
               extra=f"{len(steady)} clicks, each counted by the first vector covering it"),
        result("click produced → user vector on topic, p50", "s", p50,
               extra=f"{len(latencies)} of {n} clicks covered; {missing} not covered within the run (+3 s)"),
        result("click produced → user vector on topic, p99", "s", p99, extra=f"{n} clicks at {click_rate:g}/s"),
        result("vectors re-published after model updates", "vectors", refreshed[0]),
    ]


def model_phase(system: LocalSystem, click_rate: float, seconds: float, n_users: int, n_items: int,
                samples: dict[str, Any]) -> list[Result]:
    """Click event time → the indexer serving a model that trained on it."""
    settings = system.settings
    assert settings is not None
    pending: deque[int] = deque()  # event times of produced clicks, in order, not yet served
    latencies: list[float] = []
    seen_at: list[float] = []
    started = time.monotonic()
    stop = threading.Event()
    indexer = system.processes["indexer"].settings

    def poll() -> None:
        while not stop.wait(0.05):
            body = indexer_health(indexer)  # 503 while lagging still says what is served
            if body is None:
                continue
            through = int(body.get("model_trained_through_ms") or 0)
            now_ms = time.time() * 1000
            while pending and pending[0] <= through:
                latencies.append((now_ms - pending.popleft()) / 1000.0)
                seen_at.append(time.monotonic() - started)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rng = random.Random(5)
    topic = settings.topics.clicks

    def produce(i: int) -> None:
        user = f"bench-user-{rng.randrange(n_users)}"
        ts = int(time.time() * 1000)
        system.produce_raw(topic, user.encode(), msgspec.json.encode(
            {"user_id": user, "item_id": f"fresh-{rng.randrange(n_items)}", "ts": ts}))
        pending.append(ts)

    n = _Paced(click_rate, seconds, "model phase").run(produce)
    system.flush()
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    poller.join(timeout=10)
    steady = [lat for lat, at in zip(latencies, seen_at) if at >= WARMUP_S]
    s50, s99 = percentiles(steady)
    p50, p99 = percentiles(latencies)
    samples["click produced → trained → served"] = latencies
    return [
        result(f"click produced → trained → served by the indexer, after the first {WARMUP_S:.0f} s, p50", "s", s50),
        result(f"click produced → trained → served by the indexer, after the first {WARMUP_S:.0f} s, p99", "s", s99,
               extra=f"{len(steady)} clicks"),
        result("click produced → trained → served by the indexer, p99", "s", p99,
               extra=f"{len(latencies)} of {n} clicks at {click_rate:g}/s served within the run (+10 s); p50 {p50:.3f}"),
    ]


def trainer_phase(system: LocalSystem, n: int) -> list[Result]:
    """The trainer's clicks/s through a backlog that is in the topic before it reads any of it.

    The backlog is produced while the trainer is stopped; the restarted trainer's clock runs from
    its partition assignment, as its /metrics report it (its start and group join excluded, as
    the raw consumer's clock starts at its first fetch), until its group's lag is zero (everything
    trained and committed); records it consumed before the assignment was seen are not counted. Raw: a plain kafka-python consumer reading the same topic in this run."""
    from streamrecall.devtools.bench.ingest import _raw_consume

    settings = system.settings
    assert settings is not None
    rng = random.Random(4)
    topic = settings.topics.clicks
    system.stop_role("trainer")
    for i in track(range(n), n, "trainer backlog"):
        user = f"backlog-user-{rng.randrange(5000)}"
        value = {"user_id": user, "item_id": f"fresh-{rng.randrange(2000)}", "ts": int(time.time() * 1000)}
        system.produce_raw(topic, user.encode(), msgspec.json.encode(value))
    system.flush()
    in_topic = sum(high_watermarks(settings, [topic]).values())
    system.add_role("trainer")
    trainer_group = settings.group_id("trainer")
    deadline = time.monotonic() + 600
    t0 = c0 = None
    while time.monotonic() < deadline:
        if system.metric("streamrecall_rebalances_total", "trainer", role="trainer", kind="assigned"):
            t0 = time.monotonic()
            c0 = system.metric("streamrecall_records_consumed_total", "trainer", role="trainer", topic="clicks") or 0
            break
        time.sleep(0.02)
    if c0 is not None and c0 >= in_topic:
        return [result("trainer clicks/s from Kafka (end to end)", "clicks/s", float("nan"),
                       extra=f"a backlog of {in_topic} clicks was read before it could be timed; use a larger --backlog")]
    lag = None
    while t0 is not None and time.monotonic() < deadline:
        lag = sum(r.lag for r in group_lags(settings) if r.group == trainer_group and r.topic == topic)
        if lag == 0:
            break
        time.sleep(0.1)
    if t0 is None or c0 is None or lag != 0:
        return [result("trainer clicks/s from Kafka (end to end)", "clicks/s", float("nan"),
                       extra=f"the trainer did not get through a backlog of {in_topic} clicks in 600 s")]
    ours = (in_topic - c0) / (time.monotonic() - t0)
    raw = _raw_consume(settings, in_topic, parse=False) if in_topic else float("nan")
    return [result("trainer clicks/s from Kafka (end to end)", "clicks/s", ours, ratio_to_raw=ours / raw,
                   extra=f"backlog of {in_topic} clicks produced before the trainer started; "
                         "raw = kafka-python consume of the same topic")]


@click.command("freshness")
@click.option("--phases", default="items,indexing,clicks,model,trainer", show_default=True)
@click.option("--seconds", default=60.0, show_default=True, help="Length of each paced phase.")
@click.option("--item-rate", default=1000.0, show_default=True, help="Items per second (items phase).")
@click.option("--query-rate", default=200.0, show_default=True, help="Queries per second (items phase).")
@click.option("--click-rate", default=5000.0, show_default=True, help="Clicks per second (clicks phase).")
@click.option("--model-click-rate", default=1000.0, show_default=True, help="Clicks per second (model phase).")
@click.option("--backlog", default=50_000, show_default=True, help="Backlog size (indexing, trainer phases).")
@click.option("--sample-every", default=10, show_default=True, help="Poll every Nth item for freshness.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--option", "options", multiple=True, metavar="TABLE.KEY=VALUE",
              help="A role setting for every phase (repeatable), e.g. publisher.refresh_interval_s=30: "
                   "measures a lever against the defaults in the same conditions.")
@plot_option
@json_option
def command(phases: str, seconds: float, item_rate: float, query_rate: float, click_rate: float,
            model_click_rate: float, backlog: int, sample_every: int, work_dir: Path | None, options: tuple[str, ...],
            plot_dir: Path | None, as_json: bool) -> None:
    """Freshness (item → searchable, click → user vector) and role throughput against the raw libraries."""
    wanted = [p for p in phases.split(",") if p]
    unknown = set(wanted) - {"items", "indexing", "clicks", "model", "trainer"}
    if unknown:
        raise click.UsageError(f"--phases: unknown {sorted(unknown)}")
    from streamrecall.devtools.evaluate import parse_options

    role_options = parse_options(options)
    results: list[Result] = []
    samples: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="streamrecall-bench-") as tmp:
        root = work_dir or Path(tmp)
        if {"items", "indexing"} & set(wanted):
            with LocalSystem(root / "items", roles=["indexer"], model=MODEL, options=role_options,
                             name="fresh-items") as system:
                system.wait_healthy(120)
                wait_assigned(system, ["indexer"])
                if "items" in wanted:
                    results += items_phase(system, item_rate, query_rate, seconds, sample_every, samples)
                if "indexing" in wanted:
                    results += indexing_phase(system, backlog)
        if "clicks" in wanted:
            with LocalSystem(root / "clicks", roles=["trainer", "publisher"], model=MODEL, options=role_options,
                             name="fresh-clicks") as system:
                wait_assigned(system, ["trainer", "publisher"])
                results += clicks_phase(system, click_rate, seconds, n_users=20_000, n_items=2_000, samples=samples)
        if "model" in wanted:
            with LocalSystem(root / "model", model=MODEL, options=role_options, name="fresh-model") as system:
                system.wait_healthy(120)
                wait_assigned(system, ["trainer", "publisher", "indexer"])
                results += model_phase(system, model_click_rate, seconds, n_users=20_000, n_items=2_000,
                                       samples=samples)
        if "trainer" in wanted:
            # The trainer alone: on two cores a publisher beside it would halve its share.
            with LocalSystem(root / "trainer", roles=["trainer"], model=MODEL, options=role_options,
                             name="fresh-trainer") as system:
                wait_assigned(system, ["trainer"])
                results += trainer_phase(system, backlog)
    if plot_dir is not None:
        _plot(plot_dir, samples)
    report(results, as_json)


def _plot(plot_dir: Path, samples: dict[str, Any]) -> None:
    """freshness-cdf.png (every latency measured, as CDFs) and, with the clicks phase,
    freshness-click-vector-over-time.png (p50/p99 per 2 s window: where the tail comes from)."""
    latencies = {k: v for k, v in samples.items() if "seen at" not in k}
    plots.cdf(plot_dir / "freshness-cdf.png", latencies, title="streamrecall bench freshness: event → effect",
              xlabel="seconds from the event to its effect", target=1.0)
    lat, at = samples.get("click produced → user vector", []), samples.get("click → user vector, seen at", [])
    if lat:
        lat_a, at_a = np.asarray(lat), np.asarray(at)
        edges = np.arange(0.0, float(at_a.max()) + 2.0, 2.0)
        which = np.digitize(at_a, edges) - 1
        keep = [w for w in range(len(edges)) if (which == w).any()]
        plots.over_time(plot_dir / "freshness-click-vector-over-time.png", [edges[w] + 1.0 for w in keep],
                        {q: [float(np.percentile(lat_a[which == w], int(q[1:]))) for w in keep] for q in ("p50", "p99")},
                        title="click → user vector, per 2 s window", ylabel="seconds")
