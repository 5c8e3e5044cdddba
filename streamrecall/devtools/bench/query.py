"""`streamrecall bench query`: recall as clients see it, through the indexer's HTTP API, vs raw hnswlib.

An indexer is loaded with ``--items`` items from Kafka. A load generator in its own process
(streamrecall/devtools/bench/loadgen.py) then sends ``POST /recall`` over kept-alive connections at each
``--concurrency``, closed-loop (each connection sends its next request when the previous answer
is in), then ``POST /recall/batch`` with ``--batch-size`` vectors per request at the same
concurrencies (at 2 or more, one batch's Python work runs while another's hnswlib search,
which releases the GIL, has the cores). The index is
settled (every vector of the current model version), so answers come from the graph without
re-scoring (docs/api.md).

The raw side is ``hnswlib.Index.knn_query`` in this process on the same vectors (the same
untrained item tower), measured in the same run: one query per call on one thread for the
single form, and ``batch-size`` vectors per call on ``search_threads`` threads (the server's own
pool size) for the batch form; each the fastest of three passes. Like with like, it searches as widely as the API does (ef =
``rescore_factor`` × k: the API explores that many candidates and returns the best k), and both
it and raw at ef = k (a narrower, cheaper search) report their recall@k against the exact top k.
The ratio is API queries/s over raw queries/s at the API's breadth; the one at ef = k is in the
note. The client shares the machine's cores with the server; its CPU and the server's
are reported (``cpu`` in cores: CPU seconds over wall seconds).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec
import numpy as np

from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.devtools.bench import Result, json_option, peak_rss_mb, report, result
from streamrecall.devtools.bench.freshness import MODEL, _item, percentiles
from streamrecall.devtools.harness import LocalSystem
from streamrecall.ops.progress import track


def _load(system: LocalSystem, n: int) -> list[dict]:
    rng = random.Random(5)
    now = int(time.time() * 1000)
    values = [_item(i, now, rng) for i in range(n)]
    topic = system.settings.topics.items  # type: ignore[union-attr]
    for v in track(values, len(values), "loading items"):
        system.produce_raw(topic, v["item_id"].encode(), msgspec.json.encode(v))
    system.flush()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and int(system.get("/healthz")[1].get("items", 0)) < n:
        time.sleep(0.2)
    return values


@dataclass(frozen=True)
class Load:
    """One load-generator run: client-side figures plus the server's CPU over the same span."""

    qps: float
    p50: float
    p99: float
    errors: int
    client_cpu: float  # cores
    server_cpu: float  # cores


def _drive(system: LocalSystem, path: str, bodies: list[str], concurrency: int, requests: int,
           name: str = "indexer", servers: tuple[str, ...] = ()) -> Load:
    """Load process ``name``'s API; the server CPU is that of ``name`` and of ``servers`` (the
    processes that answer behind it: a router's shards)."""
    host, port = system.api(name).removeprefix("http://").rsplit(":", 1)
    pids = [system.processes[n].process.pid for n in (name, *servers)]  # type: ignore[union-attr]
    spec = {"host": host, "port": int(port), "path": path, "bodies": bodies, "concurrency": concurrency,
            "requests": requests, "warmup": min(requests, 4 * concurrency), "server_pids": pids}
    proc = subprocess.run([sys.executable, "-m", "streamrecall.devtools.bench.loadgen"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise click.ClickException(f"the load generator failed: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    p50, p99 = percentiles(out["latencies_s"])
    if out["errors"]:
        raise click.ClickException(f"{out['errors']} of {requests} requests to {path} were not answered 200")
    return Load(out["qps"], p50, p99, out["errors"], out["cpu_s"] / out["wall_s"], out["server_cpu_s"] / out["wall_s"])


#: Passes of the raw searches; the fastest of each is the baseline.
RAW_PASSES = 3


@dataclass(frozen=True)
class Raw:
    """In-process hnswlib at one search breadth: queries/s one per call and in batches, and recall@k."""

    ef: int
    single: float
    batched: float
    recall: float


def _raw(values: list[dict], queries: np.ndarray, k: int, efs: tuple[int, ...], batch: int,
         threads: int) -> list[Raw]:
    """In-process hnswlib at each search breadth in ``efs``: one query per call on one thread, and
    ``batch`` per call on ``threads``; recall@k against the exact top-k of the same vectors."""
    import hnswlib

    from streamrecall.events import Item
    from streamrecall.model.config import ModelConfig
    from streamrecall.model.replica import TowerReplica

    vectors = TowerReplica(ModelConfig(**MODEL)).encode_items([msgspec.convert(v, Item) for v in values])
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=16, ef_construction=200)
    index.add_items(vectors, np.arange(len(vectors)))
    k = min(k, len(vectors))
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    chunks = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)] or [queries]
    out = []
    for ef in efs:
        index.set_ef(max(ef, k))
        single = batched = 0.0
        for _ in range(RAW_PASSES):  # the best pass: raw at its fastest on this shared machine
            index.set_num_threads(1)
            started = time.perf_counter()
            found = [index.knn_query(q, k=k)[0][0] for q in queries]
            single = max(single, len(queries) / (time.perf_counter() - started))
            index.set_num_threads(threads)
            started = time.perf_counter()
            for chunk in chunks:
                index.knn_query(chunk, k=k)
            batched = max(batched, sum(len(c) for c in chunks) / (time.perf_counter() - started))
        recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))
        out.append(Raw(max(ef, k), single, batched, recall))
    return out


def _cpu_note(load: Load) -> str:
    return f"client {load.client_cpu:.2f} cores, server {load.server_cpu:.2f} cores"


@click.command("query")
@click.option("--items", "n_items", default=20_000, show_default=True, help="Items in the index.")
@click.option("--queries", "n_queries", default=2_000, show_default=True,
              help="POST /recall requests per measurement.")
@click.option("--concurrency", multiple=True, type=click.IntRange(1, 1024), default=(1, 8, 32), show_default=True,
              help="Kept-alive connections of the load generator (repeat for several runs).")
@click.option("--batch-size", default=64, show_default=True, help="Vectors per POST /recall/batch.")
@click.option("--batch-requests", default=60, show_default=True, help="POST /recall/batch requests per measurement.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@json_option
def command(n_items: int, n_queries: int, concurrency: tuple[int, ...], batch_size: int, batch_requests: int,
            work_dir: Path | None, as_json: bool) -> None:
    """Recall API throughput and latency with kept-alive clients, against raw hnswlib knn_query."""
    rng = np.random.default_rng(11)
    dim = int(MODEL.get("dim", 64))
    queries = rng.standard_normal((max(n_queries, batch_size), dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    threads = IndexerOptions().search_threads
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="streamrecall-bench-") as tmp:
        with LocalSystem(Path(work_dir or tmp) / "query", roles=["indexer"], model=MODEL, name="bench-query") as system:
            system.wait_healthy(120)
            values = _load(system, n_items)
            options = IndexerOptions()
            k = 100
            # The API searches hnswlib for rescore_factor × k candidates and returns the best k
            # (docs/api.md): like with like is raw knn_query at that breadth (same search, same
            # recall). Raw at ef=k, a narrower search with a lower recall, is reported beside it.
            breadth = max(options.ef, math.ceil(options.rescore_factor * k))
            same, narrow = _raw(values, queries, k, (breadth, k), batch_size, threads)

            def raw_note(qps: float) -> str:
                return (f"raw knn_query {same.single:,.0f}/s at the API's search breadth (ef={same.ef}, recall@{k} "
                        f"{same.recall:.3f}; at ef={narrow.ef} {narrow.single:,.0f}/s, recall {narrow.recall:.3f}, "
                        f"ratio {qps / narrow.single:.3f}), 1 thread, {n_items} items")

            bodies = [json.dumps({"vector": q.tolist(), "k": k}) for q in queries[:n_queries]]
            for c in concurrency:
                load = _drive(system, "/recall", bodies, c, n_queries)
                results += [
                    result(f"POST /recall k={k}, {c} kept-alive", "queries/s", load.qps,
                           ratio_to_raw=load.qps / same.single,
                           extra=f"{raw_note(load.qps)}; {_cpu_note(load)}"),
                    result(f"POST /recall k={k}, {c} kept-alive, p50", "s", load.p50),
                    result(f"POST /recall k={k}, {c} kept-alive, p99", "s", load.p99),
                ]
            batch_bodies = [json.dumps({"k": k, "queries": [{"vector": v.tolist()} for v in
                                                           queries[i:i + batch_size]]})
                            for i in range(0, len(queries) - batch_size + 1, batch_size)]
            for c in concurrency:
                load = _drive(system, "/recall/batch", batch_bodies, c, max(batch_requests, 4 * c))
                qps = load.qps * batch_size
                results += [
                    result(f"POST /recall/batch of {batch_size} k={k}, {c} kept-alive", "queries/s", qps,
                           ratio_to_raw=qps / same.batched,
                           extra=f"raw batch knn_query {same.batched:,.0f}/s at ef={same.ef} ({batch_size} per "
                                 f"call, {threads} threads; at ef={narrow.ef} {narrow.batched:,.0f}/s, ratio "
                                 f"{qps / narrow.batched:.3f}); {_cpu_note(load)}"),
                    result(f"POST /recall/batch of {batch_size} k={k}, {c} kept-alive, p50", "s", load.p50),
                ]
            results.append(result("bench process peak RSS", "MiB", peak_rss_mb()))
    report(results, as_json)
