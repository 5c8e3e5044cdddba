"""`streamrecall bench shards`: a sharded index against one indexer, on this machine, in one run.

One broker, one ``items`` topic of ``--partitions`` partitions, ``--items`` items, and in the same
run:

* **ingest**: the time from a process's API answering (its poll loop starts right after) to all of
  its share indexed, for one indexer
  holding every item, then for two shards started together (each holds half; both compete for the
  same cores, as they would not on two machines);
* **queries**: ``POST /recall`` (k=100, vectors) through the load generator (its own process,
  kept-alive connections) to the one indexer directly, to a router over that one indexer
  (1 shard), and to a router over the two shards (2 shards). The server CPU reported is the
  router's plus its shards'.
* **memory**: each process's resident set (VmRSS) once loaded.

The machine's cores and load are part of every figure (``extra``): on a machine whose cores are
all busy two shards cannot answer faster than one; what this run measures is the cost of the
fan-out and the merge, and what a shard holds.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import click
import msgspec
import numpy as np

from streamrecall.devtools.bench import Result, json_option, report, result
from streamrecall.devtools.bench.freshness import _item
from streamrecall.devtools.bench.loadgen import cpu_seconds
from streamrecall.devtools.bench.query import _cpu_note, _drive
from streamrecall.devtools.harness import LocalSystem

MODEL = {"id_buckets": 1 << 17, "estimator_buckets": 1 << 17}
K = 100


def _rss_mb(system: LocalSystem, name: str) -> float:
    pid = system.processes[name].process.pid  # type: ignore[union-attr]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _items(system: LocalSystem, name: str) -> int | None:
    """Items ``name`` holds (its /healthz), None while it does not answer yet."""
    try:
        return int(system.get("/healthz", name)[1].get("items", 0))
    except OSError:
        return None


def _ingest_seconds(system: LocalSystem, names: list[str], total: int, timeout_s: float = 900) -> float:
    """Seconds from the moment every one of ``names`` answers HTTP (its API starts just before its
    poll loop) to all ``total`` items indexed over them."""
    deadline = time.monotonic() + timeout_s
    first = None
    while time.monotonic() < deadline:
        system.check_alive()
        held = [_items(system, n) for n in names]
        now = time.monotonic()
        if first is None and all(h is not None for h in held):
            first = now
        if first is not None and sum(h or 0 for h in held) >= total:
            return now - first
        time.sleep(0.02)
    raise click.ClickException(f"{names} did not index {total} items within {timeout_s:.0f}s")


def _wait_ready(system: LocalSystem, name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        system.check_alive()
        try:
            if system.get("/healthz", name)[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise click.ClickException(f"{name} did not get ready within {timeout_s:.0f}s")


def _load_note() -> str:
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


@click.command("shards")
@click.option("--items", "n_items", default=20_000, show_default=True, help="Items in the index.")
@click.option("--partitions", default=4, show_default=True, help="Partitions of the items topic.")
@click.option("--queries", "n_queries", default=2_000, show_default=True, help="POST /recall per measurement.")
@click.option("--concurrency", multiple=True, type=click.IntRange(1, 1024), default=(1, 8), show_default=True,
              help="Kept-alive connections of the load generator (repeat for several runs).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@json_option
def command(n_items: int, partitions: int, n_queries: int, concurrency: tuple[int, ...], work_dir: Path | None,
            as_json: bool) -> None:
    """Ingest, query throughput and memory: one indexer vs a router over 1 and over 2 shards."""
    rng = np.random.default_rng(11)
    dim = int(MODEL.get("dim", 64))
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bodies = [json.dumps({"vector": q.tolist(), "k": K}) for q in queries]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="streamrecall-bench-") as tmp:
        root = Path(work_dir or tmp) / "shards"
        # A deadline far above any answer time here: throughput of whole answers, not of partial ones
        # (a loaded two-core machine misses 250 ms now and then); incomplete answers are counted below.
        options = {"router": {"deadline_ms": 10_000}}
        with LocalSystem(root, roles=[], model=MODEL, partitions=partitions, name="bench-shards",
                         options=options) as system:
            assert system.settings is not None
            item_rng = random.Random(5)
            now = int(time.time() * 1000)
            topic = system.settings.topics.items
            for i in range(n_items):
                value = _item(i, now, item_rng)
                system.produce_raw(topic, value["item_id"].encode(), msgspec.json.encode(value))
            system.flush()

            system.add_role("indexer", "single")
            one = _ingest_seconds(system, ["single"], n_items)
            for i in range(2):
                system.add_role("indexer", f"shard{i}", args=("--shard", str(i), "--shards", "2"))
            two = _ingest_seconds(system, ["shard0", "shard1"], n_items)
            note = f"{n_items} items, {partitions} partitions; {_load_note()}"
            results += [result("ingest: 1 indexer, every item", "items/s", n_items / one, extra=note),
                        result("ingest: 2 shards at once, half each", "items/s", n_items / two,
                               ratio_to_raw=one / two, extra=note + "; ratio: speed-up over 1 indexer")]

            system.add_role("router", "router1", args=("--shard-urls", system.api("single")))
            system.add_role("router", "router2",
                            args=("--shard-urls", f"{system.api('shard0')};{system.api('shard1')}"))
            for name in ("router1", "router2"):
                _wait_ready(system, name)
            for c in concurrency:
                direct = _drive(system, "/recall", bodies, c, n_queries, name="single")
                routed, router_ms = {}, {}
                for n in (1, 2):
                    pid = system.processes[f"router{n}"].process.pid  # type: ignore[union-attr]
                    before = cpu_seconds(pid)
                    routed[n] = _drive(system, "/recall", bodies, c, n_queries, name=f"router{n}",
                                       servers=("single",) if n == 1 else ("shard0", "shard1"))
                    router_ms[n] = (cpu_seconds(pid) - before) * 1000 / n_queries  # warm-up included: a bit high
                extra = f"k={K}, {c} kept-alive; {_load_note()}"
                results += [result(f"POST /recall, 1 indexer direct, {c} conn", "queries/s", direct.qps,
                                   extra=f"{extra}; {_cpu_note(direct)}"),
                            result(f"POST /recall, 1 indexer direct, {c} conn, p50", "s", direct.p50),
                            result(f"POST /recall, 1 indexer direct, {c} conn, server CPU per query", "ms",
                                   1000 * direct.server_cpu / direct.qps)]
                for n, load in routed.items():
                    results += [result(f"POST /recall via router, {n} shard{'s' if n > 1 else ''}, {c} conn",
                                       "queries/s", load.qps, ratio_to_raw=load.qps / direct.qps,
                                       extra=f"{extra}; ratio: over the indexer direct; {_cpu_note(load)} "
                                             f"(router and shards); router {router_ms[n]:.2f} CPU ms per query"),
                                result(f"POST /recall via router, {n} shard{'s' if n > 1 else ''}, {c} conn, p50",
                                       "s", load.p50),
                                result(f"POST /recall via router, {n} shard{'s' if n > 1 else ''}, {c} conn, "
                                       "server CPU per query", "ms", 1000 * load.server_cpu / load.qps,
                                       extra=f"router and its shards; the router alone {router_ms[n]:.2f} ms")]
            for name in ("router1", "router2"):
                incomplete = sum(system.metric("streamrecall_router_incomplete_answers_total", name, kind=kind) or 0
                                 for kind in ("partial", "none"))
                results.append(result(f"incomplete answers: {name}", "answers", incomplete,
                                      extra="partial or none, over every measurement (deadline 10 s)"))
            for name in ("single", "shard0", "shard1", "router2"):
                results.append(result(f"resident memory: {name}", "MiB", _rss_mb(system, name),
                                      extra=f"{n_items} items over the index; no user vectors"))
    report(results, as_json)
