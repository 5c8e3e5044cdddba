"""`streamrecall bench scale`: the whole system at a production size, on the embedded broker.

Every role runs as its own process with the default settings (the ``[model]`` defaults unless
``--id-buckets`` shrinks the tables). ``--items`` items are produced and indexed, then
``--clicks`` clicks of ``--users`` users (items drawn Zipf-like) are trained on and published.
Throughout, the indexer's ``/healthz`` is sampled every 0.5 s (stale share: items encoded by a
version before the current epoch) and ``GET /recall`` asked every 50 ms. After the clicks, the
next full update makes the publisher re-publish every active user; fresh clicks are produced
meanwhile. Reported:

- the last full update's bytes and chunk count, and the largest record on ``model-updates``
  (read back from the topic);
- a replica's time to decode and apply that full update (``TowerReplica.apply`` in this
  process, on the payload read back);
- index rebuild time (the indexer's own log line for each rebuild of every item);
- re-encode work from the first click to the end: items re-encoded in place (drifted past
  ``reencode_drift_bound``) and by rebuilds, against the items × updates a re-encode of every
  item at every update would have cost;
- staleness over time, from the same /healthz samples: the share of items encoded more than
  ``stale_after_versions`` versions or ``stale_after_s`` seconds behind, the mean drift and the
  share over the drift bound;
- query p99 while a rebuild runs (a /healthz sample shows a stale share above 0) and otherwise;
- click → vector p99 during the re-publication and over ``--baseline-s`` of the same fresh clicks
  after it (the publisher's histograms, their delta over each window: the upper bound of the bucket
  holding the 99th percentile), whole and by stage (produce, deliver, hold);
- peak RSS (``VmHWM``) of each role process and of the broker.
"""

from __future__ import annotations

import random
import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import click
import msgspec
import numpy as np
from kafka import TopicPartition

from streamrecall.devtools.bench import Result, json_option, plots, report, result
from streamrecall.devtools.bench.freshness import _item, percentiles
from streamrecall.devtools.bench.plots import plot_option
from streamrecall.consumers.clients import make_consumer
from streamrecall.consumers.deadletter import headers_dict
from streamrecall.consumers.roles.publisher.metrics import CLICK_STAGES
from streamrecall.consumers.update_chunks import HEADER_CHUNK, HEADER_KIND, HEADER_SIZE
from streamrecall.devtools.harness import LocalSystem
from streamrecall.metrics import FRESHNESS_BUCKETS
from streamrecall.model import ModelConfig, TowerReplica, decode_update
from streamrecall.ops.progress import track

#: The staleness figures /healthz reports (IndexerState.staleness).
STALENESS = ("behind_versions", "behind_seconds", "drift_mean", "over_drift_bound")
_REBUILD_LINE = re.compile(r"re-encode for version \d+ done: (\d+) item\(s\) in ([0-9.]+)s \(rebuild\)")


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of process ``pid`` in MiB (``VmHWM`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class _Observer:
    """Samples /healthz every 0.5 s and times GET /recall every 50 ms on background threads."""

    def __init__(self, system: LocalSystem, n_users: int) -> None:
        self.system, self.n_users = system, n_users
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, float, int]] = []      # (t, stale share, items)
        self.staleness: list[dict[str, float]] = []            # /healthz's staleness figures, per sample
        self.queries: list[tuple[float, bool]] = []            # (latency s, during a rebuild)
        self._rebuilding = False                               # as the latest /healthz said
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._sample, self._query)]

    def __enter__(self) -> "_Observer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    @property
    def rebuilding(self) -> bool:
        return self._rebuilding

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                body = self.system.get("/healthz", timeout_s=5)[1]
                self.samples.append((time.monotonic() - self.t0, float(body["stale_share"]), int(body["items"])))
                self.staleness.append({k: float(body.get(k, 0.0)) for k in STALENESS})
                self._rebuilding = bool(body.get("rebuilding")) or float(body["stale_share"]) > 0
            except (OSError, KeyError, TypeError, ValueError):
                pass

    def _query(self) -> None:
        base, rng = self.system.api(), random.Random(3)
        while not self._stop.wait(0.05):
            url = f"{base}/recall?user_id=u{rng.randrange(self.n_users)}&k=50"
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
            except OSError:
                continue
            self.queries.append((time.perf_counter() - started, self.rebuilding))


def _click(user: int, item: int, ts: int) -> bytes:
    return msgspec.json.encode({"user_id": f"u{user}", "item_id": f"fresh-{item}", "ts": ts})


#: The publisher's click → vector histogram and its stages (CLICK_STAGES), as (name, labels).
_CLICK_HISTOGRAMS = [("streamrecall_publisher_click_to_vector_seconds", {}),
                     *(("streamrecall_publisher_click_stage_seconds", {"stage": s}) for s in CLICK_STAGES)]


def _histograms(system: LocalSystem) -> list[np.ndarray]:
    """Cumulative counts of each of _CLICK_HISTOGRAMS, one per bucket (+Inf last)."""
    les = [*(str(float(b)) for b in FRESHNESS_BUCKETS), "+Inf"]
    return [np.array([system.metric(f"{name}_bucket", "publisher", le=le, **labels) or 0.0 for le in les])
            for name, labels in _CLICK_HISTOGRAMS]


class _DeliveryProbe:
    """A consumer of its own, doing nothing else, reading the clicks topic from its end: record
    timestamp → received, per record. What the broker alone adds to the publisher's deliver stage."""

    def __init__(self, system: LocalSystem, topic: str) -> None:
        self.consumer = make_consumer(system.settings, None)  # type: ignore[arg-type]
        parts = self.consumer.partitions_for_topic(topic) or set()
        self.consumer.assign([TopicPartition(topic, p) for p in parts])
        self.consumer.seek_to_end()
        self.since_ms = time.time() * 1000  # older records (read if the seek is late) are not fresh clicks
        self.delays: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delivery-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self.consumer.poll(timeout_ms=100).values():
                now = time.time() * 1000
                self.delays += [max(0.0, now - r.timestamp) / 1000 for r in records if r.timestamp >= self.since_ms]

    def close(self) -> list[float]:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()
        return self.delays


def _fresh_clicks(system: LocalSystem, topic: str, rng: random.Random, n_users: int, n_items: int, rate: float,
                  go_on: Callable[[float], bool], what: str) -> list[Result]:
    """Fresh clicks at ``rate`` while ``go_on(seconds so far)``; click → vector p99, whole and by
    stage, and the broker's delivery to an idle consumer of its own."""
    probe = _DeliveryProbe(system, topic)
    before, fresh, started = _histograms(system), 0, time.monotonic()
    while go_on(time.monotonic() - started):
        user = rng.randrange(n_users)
        system.produce_raw(topic, f"u{user}".encode(), _click(user, rng.randrange(n_items), int(time.time() * 1000)))
        fresh += 1
        time.sleep(1 / rate)
    window = time.monotonic() - started
    system.flush()
    time.sleep(2.0)
    after = _histograms(system)
    delivered = probe.close()
    p99, observed = _p99_bucket(before[0], after[0])
    stages = ", ".join(f"{stage} {_p99_bucket(b, a)[0]:g}" for stage, b, a in zip(CLICK_STAGES, before[1:], after[1:]))
    return [result(f"click -> vector p99 {what}", "s", p99,
                   extra=f"{fresh} fresh clicks over {window:.1f}s; {observed} vectors observed; upper bound of "
                         f"the histogram bucket; p99 by stage: {stages}"),
            result(f"click -> an idle consumer p99 {what}", "s", percentiles(delivered)[1],
                   extra=f"{len(delivered)} clicks: record timestamp to received by a consumer doing nothing else")]


def _p99_bucket(before: np.ndarray, after: np.ndarray) -> tuple[float, int]:
    """Upper bound (s) of the bucket holding the 99th percentile of the observations in between."""
    delta = after - before
    n = int(delta[-1])
    if n == 0:
        return float("nan"), 0
    i = int(np.searchsorted(delta, 0.99 * n))
    return (float(FRESHNESS_BUCKETS[i]) if i < len(FRESHNESS_BUCKETS) else float("inf")), n


def _model_updates(system: LocalSystem) -> tuple[int, int, int, bytes]:
    """(largest record bytes, last full update bytes, its chunks, its payload) read from the topic."""
    topic = system.settings.topics.model_updates  # type: ignore[union-attr]
    consumer = make_consumer(system.settings, None)  # type: ignore[arg-type]
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    largest, full, current, chunks = 0, b"", bytearray(), 0
    try:
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    h = headers_dict(r.headers)
                    largest = max(largest, len(r.value or b"") + sum(len(k) + len(v or b"") for k, v in r.headers))
                    if h.get(HEADER_KIND) != "full":
                        continue
                    index, count = (int(x) for x in h.get(HEADER_CHUNK, "0/1").split("/"))
                    if index == 0:
                        current = bytearray()
                    current += r.value or b""
                    if index == count - 1 and len(current) == int(h.get(HEADER_SIZE, -1)):
                        full, chunks = bytes(current), count
    finally:
        consumer.close(autocommit=False)
    return largest, len(full), chunks, full


def _answers(system: LocalSystem, n_items: int, users: np.ndarray, sample: int, k: int = 100) -> list[Result]:
    """What the acceptance asks of the end state, on ``sample`` random items and clicked users: each
    item is in the index and found by its own stored vector within the top ``k`` (the FM scores by
    inner product, so another item can outscore an item's own vector; the share says how often);
    each user is answered from their own published vector (route ``user-vector``)."""
    rng = random.Random(11)
    held = found = 0
    for i in rng.sample(range(n_items), min(sample, n_items)):
        status, body = system.get(f"/items/fresh-{i}?with_vector=1", admin=True, timeout_s=30)
        if status != 200:
            continue
        held += 1
        status, answer = system.post("/recall", {"vector": body["vector"], "k": k}, timeout_s=30)
        found += status == 200 and f"fresh-{i}" in {r["item_id"] for r in answer["results"]}
    own = 0
    picked = [int(u) for u in np.random.default_rng(12).choice(users, min(sample, len(users)), replace=False)]
    for u in picked:
        status, body = system.get(f"/recall?user_id=u{u}&k=10", timeout_s=30)
        own += status == 200 and body.get("route") == "user-vector"
    n = min(sample, n_items)
    return [result("sampled items in the index", "ratio", held / n, extra=f"{held} of {n}"),
            result(f"sampled items found by their own vector in the top {k}", "ratio", found / n,
                   extra=f"{found} of {n}"),
            result("sampled clicked users answered from their own vector", "ratio", own / len(picked),
                   extra=f"{own} of {len(picked)}")]


def _rebuilds(log_path: Path, n_items: int) -> list[float]:
    """Seconds of every rebuild of (at least) every item, from the indexer's log."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [float(s) for n, s in _REBUILD_LINE.findall(text) if int(n) >= n_items]


@click.command("scale")
@click.option("--items", "n_items", default=1_000_000, show_default=True, help="Items produced and indexed.")
@click.option("--users", "n_users", default=1_000_000, show_default=True, help="Distinct users clicking.")
@click.option("--clicks", "n_clicks", default=2_000_000, show_default=True, help="Clicks produced.")
@click.option("--id-buckets", type=int, default=None,
              help="[model] id_buckets and estimator_buckets (default: the model's own, 1,000,000).")
@click.option("--full-every-s", type=float, default=None,
              help="[trainer] full_every_s (default: the trainer's, 60 s, spaced out for a big model by "
                   "full_bytes_per_s).")
@click.option("--fresh-click-rate", default=20.0, show_default=True,
              help="Fresh clicks/s produced during the re-publication.")
@click.option("--baseline-s", default=60.0, show_default=True,
              help="Seconds of fresh clicks after the re-publication, for the click -> vector p99 without it.")
@click.option("--timeout-s", default=3600.0, show_default=True, help="Bound on each wait for the system.")
@click.option("--sample", default=200, show_default=True,
              help="Items and users checked at the end (in the index, found by own vector, own user vector).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@plot_option
@json_option
def command(n_items: int, n_users: int, n_clicks: int, id_buckets: int | None, full_every_s: float | None,
            fresh_click_rate: float, baseline_s: float, timeout_s: float, sample: int, work_dir: Path | None,
            plot_dir: Path | None, as_json: bool) -> None:
    """Full-update size, replica apply, rebuild, staleness, latencies and peak RSS per role at scale."""
    model: dict[str, Any] = {} if id_buckets is None else {"id_buckets": id_buckets, "estimator_buckets": id_buckets}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="streamrecall-bench-") as tmp:
        root = Path(work_dir or tmp) / "scale"
        options = {"trainer": {"full_every_s": full_every_s}} if full_every_s is not None else {}
        with LocalSystem(root, model=model, name="bench-scale", options=options) as system, \
                _Observer(system, n_users) as seen:
            if not system.wait_healthy(timeout_s):
                raise click.ClickException("the indexer did not become healthy")
            items_topic, clicks_topic = system.settings.topics.items, system.settings.topics.clicks  # type: ignore[union-attr]
            rng, now = random.Random(5), int(time.time() * 1000)
            started = time.monotonic()
            for i in track(range(n_items), n_items, "producing items"):
                v = _item(i, now, rng)
                system.produce_raw(items_topic, v["item_id"].encode(), msgspec.json.encode(v))
            system.flush()
            deadline = time.monotonic() + timeout_s
            while int(system.get("/healthz", timeout_s=10)[1].get("items", 0)) < n_items:
                system.check_alive()
                if time.monotonic() > deadline:
                    raise click.ClickException("the indexer did not index every item in time")
                time.sleep(0.5)
            results.append(result(f"index {n_items} items from Kafka", "items/s",
                                  n_items / (time.monotonic() - started)))

            upserts_before = {cause: system.metric("streamrecall_index_upserts_total", "indexer", cause=cause) or 0.0
                              for cause in ("reencode", "rebuild")}
            version_before = system.metric("streamrecall_model_version", "indexer", role="indexer") or 0.0
            # Clicks: users uniform, items Zipf-like (a few popular, a long tail).
            users = np.random.default_rng(7).integers(0, n_users, n_clicks)
            items = np.minimum((np.random.default_rng(8).pareto(1.2, n_clicks) * n_items / 50).astype(np.int64),
                               n_items - 1)
            ts = int(time.time() * 1000)
            for j in track(range(n_clicks), n_clicks, "producing clicks"):
                system.produce_raw(clicks_topic, f"u{users[j]}".encode(), _click(int(users[j]), int(items[j]), ts + j // 1000))
            system.flush()
            if not system.wait_caught_up(timeout_s, settle_s=1.0):
                raise click.ClickException("the roles did not catch up with the clicks in time")
            results.append(result(f"train and publish {n_clicks} clicks of {n_users} users", "clicks/s",
                                  n_clicks / (time.monotonic() - started)))

            # The next full update re-publishes every active user: fresh clicks meanwhile. It is due
            # the trainer's full-update interval after the last (longer for a big model).
            interval = system.metric("streamrecall_trainer_full_update_interval_seconds", "trainer") or 60.0
            deadline = time.monotonic() + interval + 60
            while (system.metric("streamrecall_publisher_pending_refresh_users", "publisher") or 0) == 0:
                system.check_alive()
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            def pending() -> float:
                return system.metric("streamrecall_publisher_pending_refresh_users", "publisher") or 0

            results += _fresh_clicks(system, clicks_topic, rng, n_users, n_items, fresh_click_rate,
                                     lambda elapsed: pending() > 0 and elapsed < timeout_s, "during a re-publication")
            # The same clicks once the round is over: what "leaves fresh-click latency untouched" is
            # measured against. Without clicks the rest of the round goes at refresh_per_tick a loop;
            # the deltas these clicks train then queue only their own checks of the active users.
            deadline = time.monotonic() + timeout_s
            while pending() > 0 and time.monotonic() < deadline:
                system.check_alive()
                time.sleep(1.0)
            if pending() > 0:
                results.append(result("click -> vector p99 after the re-publication", "s", float("nan"),
                                      extra=f"not measured: the re-publication was not over {timeout_s:.0f}s "
                                            "after the fresh clicks stopped"))
            else:
                results += _fresh_clicks(system, clicks_topic, rng, n_users, n_items, fresh_click_rate,
                                         lambda elapsed: elapsed < baseline_s, "after the re-publication")

            rss = {name: vm_hwm_mb(proc.process.pid) for name, proc in system.processes.items()  # type: ignore[union-attr]
                   if proc.process is not None}
            if system.broker is not None and getattr(system.broker, "process", None) is not None:
                rss["broker"] = vm_hwm_mb(system.broker.process.pid)
            upserts = {cause: (system.metric("streamrecall_index_upserts_total", "indexer", cause=cause) or 0.0)
                       - before for cause, before in upserts_before.items()}
            versions = (system.metric("streamrecall_model_version", "indexer", role="indexer") or 0.0) - version_before
            kept = system.metric("streamrecall_index_drift_checks_total", "indexer", outcome="kept") or 0.0
            largest, full_bytes, chunks, payload = _model_updates(system)
            rebuilds = _rebuilds(system.state_dir / "logs" / "indexer.log", n_items)
            answers = _answers(system, n_items, np.unique(users), sample)
            system.check_alive()

        results += [
            result("full model update", "bytes", full_bytes, extra=f"{chunks} chunks"),
            result("full model update chunks", "records", chunks),
            result("largest record on model-updates", "bytes", largest),
        ]
        if payload:
            replica = TowerReplica(ModelConfig(**model))
            started = time.perf_counter()
            replica.apply(decode_update(payload, max_bytes=len(payload)))
            results.append(result("replica decodes and applies the full update", "s", time.perf_counter() - started))
        if rebuilds:
            results.append(result(f"index rebuild of {n_items} items", "s", rebuilds[-1],
                                  extra=f"{len(rebuilds)} rebuilds, max {max(rebuilds):.1f}s"))
        during = [lat for lat, rebuilding in seen.queries if rebuilding]
        other = [lat for lat, rebuilding in seen.queries if not rebuilding]
        results += [
            result("GET /recall p99 during a rebuild", "s", percentiles(during)[1], extra=f"{len(during)} queries"),
            result("GET /recall p99 otherwise", "s", percentiles(other)[1], extra=f"{len(other)} queries"),
        ]
        every = n_items * versions
        results += [
            result("items re-encoded in place (drifted past the bound)", "items", upserts["reencode"],
                   extra=f"over {versions:.0f} model updates; re-encoding every item at each would be {every:,.0f}"),
            result("items re-encoded by rebuilds", "items", upserts["rebuild"]),
            result("items past the drift bound by the estimate, kept by their exact drift", "items", kept),
        ]
        for key in STALENESS:
            values = [s[key] for s in seen.staleness]
            if values:
                results.append(result(f"index {key.replace('_', ' ')}, mean over the run", "ratio", float(np.mean(values)),
                                      extra=f"max {max(values):.3f}"))
        stale = [s for _, s, _ in seen.samples]
        if stale:
            results.append(result("index stale share, mean over the run", "ratio", float(np.mean(stale)),
                                  extra=f"max {max(stale):.3f}, {len(stale)} samples every 0.5 s"))
        results += answers
        results += [result(f"peak RSS {name}", "MiB", mb) for name, mb in sorted(rss.items())]
        if plot_dir is not None and seen.samples:
            t = [s[0] for s in seen.samples]
            series = {"stale share": stale} | {k.replace("_", " "): [s[k] for s in seen.staleness] for k in STALENESS}
            if len(seen.staleness) != len(t):
                series = {"stale share": stale}
            plots.over_time(plot_dir / "scale_staleness.png", t, series,
                            title=f"Index stale share ({n_items:,} items, {n_users:,} users)", ylabel="share")
    report(results, as_json)
