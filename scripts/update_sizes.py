"""Full model-update sizes at production scale: bytes, chunk count, largest record, and the time to
split, assemble and decode one, for the default ModelConfig (1M-row id tables, 2^18 token rows).

A full update carries every row that differs from the seeded weights; this builds one whose item-id
and user-id tables have ``--rows`` changed rows each (and every token row), the size a trainer that
has seen that many items and users publishes. No broker: the figures are the payload's and the
assembler's (docs/benchmarks.md). Usage::

    .venv/bin/python scripts/update_sizes.py --rows 100000 --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from streamrecall.consumers.update_chunks import ChunkAssembler, Complete, read_chunk, split_update
from streamrecall.model import ModelConfig
from streamrecall.model.update import ModelUpdate, SparseRows, decode_update, dense_shapes, encode_update, max_update_bytes
from streamrecall.settings import MODEL_UPDATE_CHUNK_BYTES


def full_update(config: ModelConfig, rows: int) -> ModelUpdate:
    model = config.structural()
    sparse = {}
    for table, n in (("item_id", rows), ("user_id", rows), ("token", config.token_buckets)):
        n = min(n, config.token_buckets if table == "token" else config.id_buckets)
        sparse[table] = SparseRows(torch.arange(n, dtype=torch.int64), torch.randn(n, config.dim))
    dense = {k: torch.randn(shape) for k, shape in dense_shapes(model).items()}
    return ModelUpdate(version=2, base_version=1, kind="full", dense_changed=True, model=model, dense=dense,
                       sparse=sparse, trending=[(f"item-{i}", 1.0 / (i + 1)) for i in range(config.trending_size)])


def measure(rows: int) -> dict[str, float]:
    config = ModelConfig()
    started = time.perf_counter()
    data = encode_update(full_update(config, rows))
    encoded = time.perf_counter() - started
    started = time.perf_counter()
    chunks = split_update(data, "full", 2, 1, MODEL_UPDATE_CHUNK_BYTES)
    split = time.perf_counter() - started
    largest = max(len(v) + sum(len(k) + len(h) for k, h in headers) for v, headers in chunks)
    started = time.perf_counter()
    assembler = ChunkAssembler(max_update_bytes(config.structural()))
    outcomes = [o for offset, (v, h) in enumerate(chunks) for o in assembler.add(offset, read_chunk(v, h))]
    assembled = time.perf_counter() - started
    assert len(outcomes) == 1 and isinstance(outcomes[0], Complete)
    started = time.perf_counter()
    decode_update(outcomes[0].payload, max_bytes=len(data))
    decoded = time.perf_counter() - started
    return {"rows_per_id_table": rows, "full_update_bytes": len(data), "chunks": len(chunks),
            "largest_record_bytes": largest, "encode_s": round(encoded, 2), "split_s": round(split, 3),
            "assemble_s": round(assembled, 2), "decode_s": round(decoded, 2),
            "max_assembled_bytes_default": max_update_bytes(config.structural()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="changed rows per id table (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for rows in args.rows or [100_000, 1_000_000]:
        print(json.dumps(measure(rows)), flush=True)


if __name__ == "__main__":
    main()
