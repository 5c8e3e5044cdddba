"""`streamrecall bench index`: the updatable HNSW index against raw hnswlib and exact search.

Item vectors imitate a trained item tower: L2-normalised random projections of
low-dimensional latent factors plus a little noise (what towers produce: a few
directions carry most of the variance). Queries are drawn from the same latent
space, as user vectors are. Random unit vectors, the worst case, are measured
separately on a smaller index.

Figures (all in one run, same vectors, same thread count):

* upsert throughput of ``ItemIndex.upsert`` vs raw ``hnswlib.Index.add_items``;
* update throughput (replace existing ids) vs raw in-place ``add_items`` of existing labels;
* recall@10 vs exact search and query latency p50/p99 at k=100, at the default ef,
  on a fresh index and after churn (half of the items updated twice, a fifth
  deleted and replaced by new ids);
* full re-encode as rebuild-and-swap vs in-place updates (the latter extrapolated
  from a sample);
* memory per item.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import hnswlib
import numpy as np

from streamrecall.devtools.bench import Result, json_option, peak_rss_mb, plots, report, result
from streamrecall.devtools.bench.plots import plot_option
from streamrecall.index import EntryMeta, ItemIndex

M = 16
EF_CONSTRUCTION = 200
LATENT_DIM = 12
NOISE = 0.05
UPSERT_BATCH = 1000  # ids per upsert() call, like an indexer poll batch


@dataclass
class Tower:
    """A fake item tower: latent factors -> dim-d unit vectors."""

    basis: np.ndarray  # (LATENT_DIM, dim)
    rng: np.random.Generator

    def latent(self, n: int) -> np.ndarray:
        return self.rng.standard_normal((n, self.basis.shape[0])).astype(np.float32)

    def encode(self, z: np.ndarray) -> np.ndarray:
        x = z @ self.basis
        x += NOISE * self.rng.standard_normal(x.shape).astype(np.float32)
        return unit(x)


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.intp)
    for s in range(0, len(queries), 128):
        sims = queries[s:s + 128] @ vectors.T
        out[s:s + 128] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def recall_at(index: ItemIndex, ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean |HNSW top-k ∩ exact top-k| / k over ``queries``; ``ids``/``vectors`` are the live items."""
    exact = exact_top(vectors, queries, k)
    got = index.query(queries, k)
    hits = sum(len({h.item_id for h in g} & {ids[j] for j in e}) for g, e in zip(got, exact))
    return hits / (k * len(queries))


def latency_ms(index: ItemIndex, queries: np.ndarray, k: int) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        index.query(q, k)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def upsert_all(index: ItemIndex, ids: list[str], vectors: np.ndarray, meta: EntryMeta) -> None:
    for s in range(0, len(ids), UPSERT_BATCH):
        index.upsert(ids[s:s + UPSERT_BATCH], vectors[s:s + UPSERT_BATCH], meta)


def bench_throughput(n: int, dim: int, vectors: np.ndarray, threads: int, ef: int,
                     out: list[Result]) -> tuple[ItemIndex, hnswlib.Index]:
    """Build a raw hnswlib index and an ItemIndex from the same vectors, alternating batch by batch.

    Alternating puts both under the same machine load at every moment, so the
    ratio holds on a shared machine even when absolute rates drift.
    """
    rss0 = current_rss_mb()
    raw = hnswlib.Index(space="ip", dim=dim)
    raw.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=100, allow_replace_deleted=True)
    index = ItemIndex(dim, M=M, ef_construction=EF_CONSTRUCTION, ef=ef, num_threads=threads)
    ids = [f"item-{j}" for j in range(n)]
    labels = np.arange(n)
    meta = EntryMeta(1, 0, 0, ("c",))
    raw_s = wrap_s = 0.0
    for s in range(0, n, UPSERT_BATCH):
        e = s + UPSERT_BATCH
        raw_s += timed(lambda: raw.add_items(vectors[s:e], labels[s:e], num_threads=threads))
        wrap_s += timed(lambda: index.upsert(ids[s:e], vectors[s:e], meta))
    wrapper_mb = current_rss_mb() - rss0 - raw.index_file_size() / 2**20
    out.append(result("index/raw_add_items", "items/s", n / raw_s, extra=f"hnswlib add_items, {threads} thread(s)"))
    out.append(result("index/upsert", "items/s", n / wrap_s, ratio_to_raw=raw_s / wrap_s,
                      extra=f"ItemIndex.upsert, calls of {UPSERT_BATCH} alternating with raw, growing from 1024 slots"))
    out.append(result("index/memory_per_item", "bytes", wrapper_mb * 2**20 / n,
                      extra=f"ItemIndex RSS incl. ids, tables, {index.capacity} slots allocated; "
                            f"hnswlib data alone {raw.index_file_size() / n:.0f} B/item"))
    return index, raw


def bench_fresh_quality(index: ItemIndex, ids: list[str], vectors: np.ndarray, queries: np.ndarray,
                        tag: str, out: list[Result]) -> None:
    r = recall_at(index, ids, vectors, queries)
    p50, p99 = latency_ms(index, queries, 100)
    ef = index.ef
    out.append(result(f"index/recall_at_10_{tag}", "ratio", r, extra=f"vs exact search, ef={ef}"))
    out.append(result(f"index/query_p50_k100_{tag}", "ms", p50, extra=f"single query, k=100, ef={ef}"))
    out.append(result(f"index/query_p99_k100_{tag}", "ms", p99, extra=f"single query, k=100, ef={ef}"))


def bench_churn(index: ItemIndex, raw: hnswlib.Index, tower: Tower, latent: np.ndarray, vectors: np.ndarray,
                ids: list[str], queries: np.ndarray, threads: int, out: list[Result]) -> None:
    """Half of the items updated twice, then a fifth deleted and replaced; ``latent``/``vectors`` are updated."""
    n = len(ids)
    rng = tower.rng
    half = rng.choice(n, size=n // 2, replace=False)
    raw_s = wrap_s = 0.0
    raw_n = 0
    for _round in (1, 2):
        latent[half] += 0.5 * tower.latent(len(half))
        new = tower.encode(latent[half])
        vectors[half] = new
        for b, s in enumerate(range(0, len(half), UPSERT_BATCH)):
            rows = half[s:s + UPSERT_BATCH]
            wrap_s += timed(lambda: index.upsert([ids[j] for j in rows], new[s:s + UPSERT_BATCH], EntryMeta(1, 1, 1)))
            if b % 10 == 0:  # raw in-place update of a tenth, alternating, on the same new vectors
                raw_s += timed(lambda: raw.add_items(new[s:s + UPSERT_BATCH], rows, num_threads=threads))
                raw_n += len(rows)
    per_item = wrap_s / (2 * len(half))
    out.append(result("index/update", "items/s", 1 / per_item, ratio_to_raw=(raw_s / raw_n) / per_item,
                      extra="replace existing ids (retire + reuse a slot) vs hnswlib in-place add_items"))
    fifth = rng.choice(n, size=n // 5, replace=False)
    gone = [ids[j] for j in fifth]
    fresh_ids = [f"new-{j}" for j in range(len(fifth))]
    latent[fifth] = tower.latent(len(fifth))
    new = tower.encode(latent[fifth])
    vectors[fifth] = new
    replace_s = timed(lambda: (index.delete(gone), upsert_all(index, fresh_ids, new, EntryMeta(1, 2, 2))))
    out.append(result("index/delete_and_insert", "items/s", len(fifth) / replace_s,
                      extra="delete a fifth of the ids, insert as many new ones into the vacated slots"))
    live_ids = list(ids)
    for j, new_id in zip(fifth.tolist(), fresh_ids):
        live_ids[j] = new_id
    bench_fresh_quality(index, live_ids, vectors, queries, "after_churn", out)
    bench_query_during_writes(index, live_ids, vectors, queries, out)
    st = index.stats()
    out.append(result("index/deleted_share_after_churn", "ratio", st["deleted_share"],
                      extra=f"slots {st['slots']:.0f} for {st['live']:.0f} live, capacity {st['capacity']:.0f}"))


def bench_reencode(index: ItemIndex, tower: Tower, threads: int, out: list[Result]) -> None:
    """A changed tower re-encodes every item: rebuild-and-swap against raw hnswlib building a
    fresh graph of the same new vectors on the same threads; in-place updates are extrapolated
    from a sample and carry no ratio (hnswlib has no re-encode of its own to compare with)."""
    n = len(index)
    ids = index.ids()
    fresh = dict(zip(ids, tower.encode(tower.latent(n))))
    encode = lambda item_ids: np.stack([fresh[i] for i in item_ids])  # noqa: E731  a changed tower
    sample = max(1, n // 20)
    inplace_s = timed(lambda: index.reencode(encode, 2, 1024, max_items=sample))
    rebuild_s = timed(lambda: index.reencode(encode, 3, 4096, rebuild_threshold=0.5))
    vectors = np.stack([fresh[i] for i in ids])

    def raw_build() -> None:
        raw = hnswlib.Index(space="ip", dim=vectors.shape[1])
        raw.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
        raw.add_items(vectors, np.arange(n), num_threads=threads)

    raw_s = timed(raw_build)
    out.append(result("index/reencode_raw_rebuild", "s", raw_s,
                      extra=f"hnswlib: a fresh graph of the same {n} new vectors, {threads} thread(s)"))
    out.append(result("index/reencode_rebuild_swap", "s", rebuild_s, ratio_to_raw=raw_s / rebuild_s,
                      extra=f"re-encode all {n} items into a fresh graph beside the live one, swap"))
    out.append(result("index/reencode_in_place", "s", inplace_s / sample * n,
                      extra=f"extrapolated from {sample} in-place updates (no raw counterpart)"))


def bench_ef_sweep(index: ItemIndex, raw: hnswlib.Index, ids: list[str], vectors: np.ndarray,
                   queries: np.ndarray, out: list[Result], k: int = 10) -> list[dict[str, float]]:
    """recall@10 and single-query queries/s (k=100) at several ef from 100 up (hnswlib searches
    with max(ef, k), so an ef below k=100 is the same search), ours and raw hnswlib on the same
    graph contents; returns the points for ``--plot``."""
    exact = exact_top(vectors, queries, k)
    base = index.ef
    for q in queries:  # warm both (caches, branch predictors) before the first timed ef
        index.query(q, 100)
        raw.knn_query(q, k=100, num_threads=1)
    points = []
    for ef in (100, 200, 400, 800):
        index.ef = ef
        raw.set_ef(ef)
        ours_s = timed(lambda: [index.query(q, 100) for q in queries])
        raw_s = timed(lambda: [raw.knn_query(q, k=100, num_threads=1) for q in queries])
        got = index.query(queries, k)
        r = sum(len({h.item_id for h in g} & {ids[j] for j in e}) for g, e in zip(got, exact)) / (k * len(queries))
        raw_labels, _ = raw.knn_query(queries, k=k)
        r_raw = sum(len(set(lab.tolist()) & set(e.tolist())) for lab, e in zip(raw_labels, exact)) / (k * len(queries))
        points.append({"ef": ef, "recall": r, "qps": len(queries) / ours_s, "raw_recall": r_raw,
                       "raw_qps": len(queries) / raw_s})
        out.append(result(f"index/queries_per_s_k100_ef{ef}", "queries/s", len(queries) / ours_s,
                          ratio_to_raw=raw_s / ours_s,
                          extra=f"recall@10 {r:.3f} (raw {r_raw:.3f}); raw knn_query {len(queries) / raw_s:,.0f}/s"))
    index.ef = base
    raw.set_ef(base)
    return points


def bench_query_during_writes(index: ItemIndex, ids: list[str], vectors: np.ndarray, queries: np.ndarray,
                              out: list[Result]) -> None:
    """Query latency while another thread keeps updating items (the writer holds the graph one chunk at a time)."""
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        s = 0
        while not stop.is_set():
            index.upsert(ids[s:s + 200], vectors[s:s + 200], EntryMeta(1, 3, 3))
            written[0] += 200
            s = (s + 200) % (len(ids) - 200)

    t = threading.Thread(target=writer)
    t.start()
    try:
        p50, p99 = latency_ms(index, queries, 100)
    finally:
        stop.set()
        t.join()
    extra = f"k=100 while a thread updates ({written[0]} items written), write_batch={index.write_batch}"
    out.append(result("index/query_p50_k100_during_updates", "ms", p50, extra=extra))
    out.append(result("index/query_p99_k100_during_updates", "ms", p99, extra=extra))


def bench_snapshot(index: ItemIndex, out: list[Result]) -> None:
    """The pause writers see (the in-memory copy), the whole snapshot, and a load."""
    copy_s = timed(lambda: index._s.copy())
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as tmp:
        snap_s = timed(lambda: index.snapshot(Path(tmp), {"items": {"0": len(index)}}))
        load_s = timed(lambda: ItemIndex.load(Path(tmp)))
    out.append(result("index/snapshot_copy", "ms", copy_s * 1000,
                      extra="in-memory copy under the shared lock: writers wait this long, queries never"))
    out.append(result("index/snapshot_total", "s", snap_s, extra="copy + write + fsync + atomic publish"))
    out.append(result("index/snapshot_load", "s", load_s, extra="verify digests + hnswlib load + tables"))


def bench_random(n: int, dim: int, n_queries: int, threads: int, ef: int, rng: np.random.Generator,
                 out: list[Result]) -> None:
    vectors = unit(rng.standard_normal((n, dim)).astype(np.float32))
    queries = unit(rng.standard_normal((n_queries, dim)).astype(np.float32))
    ids = [f"r-{j}" for j in range(n)]
    index = ItemIndex(dim, M=M, ef_construction=EF_CONSTRUCTION, ef=ef, num_threads=threads, initial_capacity=n)
    upsert_all(index, ids, vectors, EntryMeta(1, 0, 0))
    for e in (ef, 4 * ef, 16 * ef):
        index.ef = e
        out.append(result(f"index/random_recall_at_10_ef{e}", "ratio", recall_at(index, ids, vectors, queries),
                          extra=f"worst case: uniform random unit vectors, {n} items"))


@click.command("index")
@click.option("--items", type=int, default=200_000, show_default=True, envvar="STREAMRECALL_BENCH_ITEMS",
              help="Item vectors to index [env STREAMRECALL_BENCH_ITEMS].")
@click.option("--dim", type=int, default=64, show_default=True, envvar="STREAMRECALL_BENCH_DIM",
              help="Vector dimension [env STREAMRECALL_BENCH_DIM].")
@click.option("--queries", type=int, default=1000, show_default=True, envvar="STREAMRECALL_BENCH_QUERIES",
              help="Query vectors for recall and latency [env STREAMRECALL_BENCH_QUERIES].")
@click.option("--seed", type=int, default=0, show_default=True, envvar="STREAMRECALL_BENCH_SEED",
              help="Random seed [env STREAMRECALL_BENCH_SEED].")
@click.option("--threads", type=int, default=1, show_default=True, envvar="STREAMRECALL_BENCH_THREADS",
              help="hnswlib threads, the same for raw and wrapper [env STREAMRECALL_BENCH_THREADS].")
@click.option("--random-items", type=int, default=50_000, show_default=True,
              envvar="STREAMRECALL_BENCH_RANDOM_ITEMS",
              help="Items for the random-vector worst case (capped at --items) [env STREAMRECALL_BENCH_RANDOM_ITEMS].")
@plot_option
@json_option
def command(items: int, dim: int, queries: int, seed: int, threads: int, random_items: int, plot_dir: Path | None,
            as_json: bool) -> None:
    """Measure the updatable HNSW index: throughput, recall, latency, re-encode cost, memory."""
    if items < 200 or dim < 2 or queries < 1:
        raise click.BadParameter("need --items >= 200, --dim >= 2, --queries >= 1")
    rng = np.random.default_rng(seed)
    tower = Tower(basis=(rng.standard_normal((LATENT_DIM, dim)) / np.sqrt(LATENT_DIM)).astype(np.float32), rng=rng)
    latent = tower.latent(items)
    vectors = tower.encode(latent)
    user_queries = tower.encode(tower.latent(queries))
    ef = ItemIndex(dim).ef
    out: list[Result] = []
    index, raw = bench_throughput(items, dim, vectors, threads, ef, out)
    ids = [f"item-{j}" for j in range(items)]
    bench_fresh_quality(index, ids, vectors, user_queries, "fresh", out)
    points = bench_ef_sweep(index, raw, ids, vectors, user_queries[:300], out)
    if plot_dir is not None:
        plots.recall_vs_qps(plot_dir / "index-recall-vs-qps.png", points,
                            title=f"recall@10 against single-query speed over ef ({items:,} items, dim {dim})")
    bench_churn(index, raw, tower, latent, vectors, ids, user_queries, threads, out)
    del raw
    bench_snapshot(index, out)
    bench_reencode(index, tower, threads, out)
    del index
    bench_random(min(items, random_items), dim, min(queries, 500), threads, ef, rng, out)
    out.append(result("index/peak_rss", "MiB", peak_rss_mb(), extra=f"{items} items, dim {dim}"))
    report(out, as_json)
