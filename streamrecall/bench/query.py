"""`streamrecall bench query`: recall latency through the indexer's HTTP API vs raw hnswlib.

An indexer is loaded with ``--items`` items from Kafka; then ``--queries`` POST /recall
requests (one client thread, then ``--concurrency`` threads) at k=10 and k=100. The raw
side is ``hnswlib.Index.knn_query`` on the same vectors (the same untrained item tower)
at the same ef, in this process, measured in this run. The ratio is queries/s of the API
over raw queries/s: it prices HTTP, JSON and the read lock, not the ANN search.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path

import click
import msgspec
import numpy as np

from streamrecall.bench import Result, json_option, peak_rss_mb, report, result
from streamrecall.bench.freshness import MODEL, _item, _status, percentiles
from streamrecall.harness import LocalSystem


def _load(system: LocalSystem, n: int) -> list[dict]:
    rng = random.Random(5)
    now = int(time.time() * 1000)
    values = [_item(i, now, rng) for i in range(n)]
    topic = system.settings.topics.items  # type: ignore[union-attr]
    for v in values:
        system.produce_raw(topic, v["item_id"].encode(), msgspec.json.encode(v))
    system.flush()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and int(system.get("/healthz")[1].get("items", 0)) < n:
        time.sleep(0.2)
    return values


def _api_latencies(url: str, queries: np.ndarray, k: int, threads: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    bodies = [json.dumps({"vector": q.tolist(), "k": k}).encode() for q in queries]

    def worker(part: list[bytes]) -> None:
        for body in part:
            t0 = time.perf_counter()
            if _status(f"{url}/recall", body, timeout_s=10) == 200:
                with lock:
                    latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(bodies[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, len(latencies) / (time.perf_counter() - started)


def _raw_qps(values: list[dict], queries: np.ndarray, k: int, ef: int) -> float:
    import hnswlib

    from streamrecall.events import Item
    from streamrecall.model.config import ModelConfig
    from streamrecall.model.replica import TowerReplica

    vectors = TowerReplica(ModelConfig(**MODEL)).encode_items([msgspec.convert(v, Item) for v in values])
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=16, ef_construction=200)
    index.set_num_threads(1)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(max(ef, k))
    started = time.perf_counter()
    for q in queries:
        index.knn_query(q, k=k)
    return len(queries) / (time.perf_counter() - started)


@click.command("query")
@click.option("--items", "n_items", default=20_000, show_default=True, help="Items in the index.")
@click.option("--queries", "n_queries", default=2_000, show_default=True, help="Queries per measurement.")
@click.option("--concurrency", default=4, show_default=True, help="Client threads for the concurrent run.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@json_option
def command(n_items: int, n_queries: int, concurrency: int, work_dir: Path | None, as_json: bool) -> None:
    """Recall API latency and throughput at k=10 and k=100 against raw hnswlib knn_query."""
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((n_queries, int(MODEL.get("dim", 64)))).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="streamrecall-bench-") as tmp:
        with LocalSystem(Path(work_dir or tmp) / "query", roles=["indexer"], model=MODEL, name="bench-query") as system:
            system.wait_healthy(120)
            values = _load(system, n_items)
            ef = int(system.get("/healthz")[1].get("ef", 64))
            for k in (10, 100):
                lat, qps = _api_latencies(system.api(), queries, k, threads=1)
                raw = _raw_qps(values, queries, k, ef)
                p50, p99 = percentiles(lat)
                results += [
                    result(f"POST /recall k={k}, 1 client, p50", "s", p50, extra=f"{len(lat)} queries, {n_items} items"),
                    result(f"POST /recall k={k}, 1 client, p99", "s", p99),
                    result(f"POST /recall k={k}, 1 client", "queries/s", qps, ratio_to_raw=qps / raw,
                           extra=f"raw hnswlib knn_query {raw:,.0f}/s at ef={max(ef, k)}"),
                ]
            lat, qps = _api_latencies(system.api(), queries, 100, threads=concurrency)
            p50, p99 = percentiles(lat)
            results += [
                result(f"POST /recall k=100, {concurrency} clients", "queries/s", qps),
                result(f"POST /recall k=100, {concurrency} clients, p99", "s", p99),
                result("bench process peak RSS", "MiB", peak_rss_mb()),
            ]
    report(results, as_json)
