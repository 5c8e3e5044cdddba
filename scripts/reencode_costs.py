"""What a sparse model update costs the indexer at N items, step by step (default FM model, one core).

Builds N synthetic items (the benchmarks' item generator: 40 categories, 400 tags, 500 title words),
trains the trainer on 20,000 Zipf-like clicks, indexes every item, then for a few deltas (700 clicks
each: one trainer flush at ~3,500 clicks/s) reports the rows the delta moved, the items on them,
and the time to find them (the catalog scan), to encode them, to read their stored vectors and to
rewrite them in place (per item, on a sample), with the distribution of their relative drift
‖stored − current‖ / ‖current‖. The stored vectors are left as they are between deltas (only the
sample is rewritten), so drift accumulates as it does while the budget lags. No broker, no role
(docs/benchmarks.md, docs/api.md#re-encoding-in-proportion-to-effect). Usage::

    .venv/bin/python scripts/reencode_costs.py --items 50000
"""

from __future__ import annotations

import argparse
import json
import random
import time

import msgspec
import numpy as np
import torch

from streamrecall.devtools.bench.freshness import _item
from streamrecall.events import Click, Item
from streamrecall.index import EntryMeta, ItemIndex
from streamrecall.index.drift import relative_drift
from streamrecall.model import ModelConfig, OnlineTrainer, RecentHistory, TowerReplica, decode_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--deltas", type=int, default=3)
    parser.add_argument("--clicks-per-delta", type=int, default=700)
    parser.add_argument("--sample", type=int, default=2_000, help="items rewritten in place per delta (timed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.items
    rng, np_rng = random.Random(5), np.random.default_rng(8)
    items = [msgspec.convert(_item(i, 0, rng), Item) for i in range(n)]
    catalog = {it.item_id: it for it in items}
    config = ModelConfig()
    trainer, replica, history = OnlineTrainer(config), TowerReplica(config), RecentHistory(config.history_len)

    def train(count: int, t0: int) -> None:
        picked = np.minimum((np_rng.pareto(1.2, count) * n / 50).astype(np.int64), n - 1)
        users = np_rng.integers(0, n, count)
        clicks = [Click(user_id=f"u{u}", item_id=f"fresh-{i}", ts=t0 + j) for j, (u, i) in enumerate(zip(users, picked))]
        for s in range(0, len(clicks), 1024):
            chunk = clicks[s:s + 1024]
            trainer.step(trainer.make_batch(chunk, catalog, history.before_each(chunk)))

    train(20_000, 0)
    replica.apply(decode_update(trainer.export_update()))
    index = ItemIndex(config.dim, space="ip", M=16, ef_construction=200, ef=64)
    started = time.perf_counter()
    vectors = replica.encode_items(items)
    encode_all = time.perf_counter() - started
    started = time.perf_counter()
    for s in range(0, n, 512):
        index.upsert([it.item_id for it in items[s:s + 512]], vectors[s:s + 512], EntryMeta(1, 0, 0))
    insert_all = time.perf_counter() - started
    out: dict = {"items": n, "encode_all_s": round(encode_all, 3), "insert_us_per_item": round(insert_all / n * 1e6, 1),
                 "deltas": []}
    for step in range(args.deltas):
        train(args.clicks_per_delta, 10**7 * (step + 1))
        applied = replica.apply(decode_update(trainer.export_update()))
        started = time.perf_counter()
        touched: set[str] = set()
        for s in range(0, n, 256):
            touched.update(replica.items_touched(applied, items[s:s + 256]))
        scan = time.perf_counter() - started
        on_moved = [it for it in items if it.item_id in touched]
        started = time.perf_counter()
        current = replica.encode_items(on_moved)
        encode = time.perf_counter() - started
        started = time.perf_counter()
        _, stored = index.vectors([it.item_id for it in on_moved])
        read = time.perf_counter() - started
        drift = relative_drift(stored, current)
        m = min(args.sample, len(on_moved))
        started = time.perf_counter()
        index.upsert([it.item_id for it in on_moved[:m]], current[:m], EntryMeta(2 + step, 0, 0))
        rewrite = time.perf_counter() - started
        q = np.quantile(drift, [0.5, 0.9, 0.99]).round(4).tolist() if len(drift) else []
        out["deltas"].append({
            "moved_rows": {k: int(v.numel()) for k, v in applied.moved.items()}, "items_on_moved_rows": len(on_moved),
            "scan_s": round(scan, 3), "encode_us_per_item": round(encode / max(1, len(on_moved)) * 1e6, 1),
            "read_stored_us_per_item": round(read / max(1, len(on_moved)) * 1e6, 1),
            "rewrite_in_place_us_per_item": round(rewrite / max(1, m) * 1e6, 1), "drift_p50_p90_p99": q,
            "over_0.05": int((drift > 0.05).sum()), "over_0.2": int((drift > 0.2).sum())})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
