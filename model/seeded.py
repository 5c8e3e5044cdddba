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


def seeded_uniform(shape: tuple[int, ...], bound: float, seed: int, name: str) -> torch.Tensor:
    """A float32 tensor uniform in [-bound, bound), a pure function of (seed, name, shape)."""
    n = int(np.prod(shape))
    start = np.uint64(hash64(f"{seed}:{name}", "init"))
    with np.errstate(over="ignore"):
        bits = splitmix64(np.arange(n, dtype=np.uint64) + start)
    unit = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))  # [0, 1), exact
    return torch.from_numpy(((unit * 2.0 - 1.0) * bound).astype(np.float32).reshape(shape))
