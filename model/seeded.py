"""Deterministic initial weights that do not depend on torch's or numpy's RNG streams.

A fresh replica (the indexer's, the publisher's) must hold exactly the trainer's
initial weights, on any machine and any library version, so that updates can carry
only what changed since initialisation. SplitMix64 over (seed, parameter name, index)
gives that with vectorised numpy and no global state.
"""

from __future__ import annotations

import numpy as np
import torch

from streamrecall.model.features import hash64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser applied elementwise to a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def seeded_uniform(shape: tuple[int, ...], bound: float, seed: int, name: str,
                   rows: np.ndarray | None = None) -> torch.Tensor:
    """A float32 tensor uniform in [-bound, bound), a pure function of (seed, name, shape).

    With ``rows`` (indices along the first dimension), only those rows of that same tensor:
    ``seeded_uniform(shape, b, s, n, rows=r)`` equals ``seeded_uniform(shape, b, s, n)[r]``, at
    the cost of the rows asked for (a replica restores a few rows, not a 2^18-row table).
    """
    row_len = int(np.prod(shape[1:]))
    start = np.uint64(hash64(f"{seed}:{name}", "init"))
    if rows is None:
        index = np.arange(int(np.prod(shape)), dtype=np.uint64)
        out_shape = shape
    else:
        rows = np.asarray(rows, dtype=np.uint64).reshape(-1)
        index = (rows[:, None] * np.uint64(row_len) + np.arange(row_len, dtype=np.uint64)).reshape(-1)
        out_shape = (len(rows), *shape[1:])
    with np.errstate(over="ignore"):
        bits = splitmix64(index + start)
    unit = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))  # [0, 1), exact
    return torch.from_numpy(((unit * 2.0 - 1.0) * bound).astype(np.float32).reshape(out_shape))
