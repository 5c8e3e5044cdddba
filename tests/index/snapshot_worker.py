"""Run by test_index_snapshot.py: snapshots a growing index in a loop until killed.

After writing snapshot number s the index holds items w0..w{s*50-1} and the
offsets say {"items": {"0": s*50}} -- the next offset to read. Each directory
fsync is slowed down, so that a kill almost always lands in the middle of a write.
"""

import sys
import time
from pathlib import Path

import numpy as np

from streamrecall.index import EntryMeta, ItemIndex
from streamrecall.index import snapshot as snapshot_mod

_fsync_dir = snapshot_mod.fsync_dir


def slow_fsync_dir(directory):
    time.sleep(0.02)
    _fsync_dir(directory)


snapshot_mod.fsync_dir = slow_fsync_dir

path = Path(sys.argv[1])
rng = np.random.default_rng(0)
index = ItemIndex(8, num_threads=1, initial_capacity=64)
n = 0
while True:
    vecs = rng.standard_normal((50, 8)).astype(np.float32)
    index.upsert([f"w{j}" for j in range(n, n + 50)], vecs, EntryMeta(1, n, n))
    n += 50
    index.snapshot(path, {"items": {"0": n}})
    print(n, flush=True)
