"""Streaming estimate of each item's sampling probability (Yi et al., RecSys 2019).

Algorithm 2: arrays A (the step an item was last seen) and B (an exponential moving
average, rate α, of the gap between its occurrences) over hashed item ids; the
probability estimate is p̂ = 1/B. Algorithm 3 (``hashes > 1``) keeps one (A, B) pair per
hash function and predicts from the largest gap, since a collision only shortens gaps.

Choices made here (all documented in docs/model.md):

- **A step is one example**, not one batch: ``step`` counts examples, so p̂ is the
  per-example probability of the item and does not depend on the micro-batch size.
- **An item occurring k times in one batch** contributes k gaps at once: its positions
  in the batch are known, the mean gap is (last position − A)/k, and it is folded in
  with the weight of k sequential updates, B ← (1−α)^k·B + (1−(1−α)^k)·mean_gap. This
  is exactly Algorithm 2 run per example when the k gaps are equal.
- **Bias-corrected start**: B starts at 0 and the estimate is B / (1 − (1−α)^n) over the
  n gaps seen (as Adam corrects its moments), so the first gaps give an unbiased
  estimate instead of dragging B up from an arbitrary prior. Without a prior
  (``prior_gaps=0``) an item with no gap yet (seen once) gets p_min.
- **Cold-start prior** (``prior_gaps=c > 0``): the estimate is the posterior mean of a
  Gamma–Poisson model with exponential forgetting. Before any gap, the item's rate is
  believed to be 1/G₀ with the weight of c gaps, where G₀ is the typical gap of an item
  seen so far (the number of distinct items seen: under a flat prior over them, each
  occurs once per G₀ examples). The prior decays with every gap as an old gap does in
  the EMA, so p̂ = (1 − w + cα·w) / (B + cα·w·G₀) with w = (1−α)^n. An item seen once
  gets 1/G₀ instead of p_min (which would give it a correction larger than any real
  tail item), its first, noisy one-gap estimates are pulled toward 1/G₀, and after a
  few hundred gaps (w → 0) the prior is gone. c = 0 is the estimate above, exactly.
- **Staleness**: the gap used is max(B̂, (step − A)/3): an item unseen for more than
  three times its expected gap (probability e⁻³ if its rate held) loses probability,
  though B itself only moves when the item is seen.
- p̂ is clipped to [p_min, 1].

The state (A, B, n, step) is saved with every checkpoint, so a restart keeps the
estimate instead of re-living the cold-start bias. The count of distinct items seen is
not state of its own: it is recounted from A on load.
"""

from __future__ import annotations

import numpy as np
import torch

from streamrecall.model.errors import ModelError
from streamrecall.model.seeded import splitmix64

_STALE_FACTOR = 3.0


class FrequencyEstimator:
    def __init__(self, buckets: int, *, hashes: int = 1, alpha: float = 0.01, p_min: float = 1e-6,
                 prior_gaps: float = 0.0) -> None:
        self.buckets = buckets
        self.hashes = hashes
        self.alpha = alpha
        self.p_min = p_min
        self.prior_gaps = prior_gaps
        self.last_seen = torch.full((hashes, buckets), -1, dtype=torch.int64)  # A
        self.gap_ema = torch.zeros((hashes, buckets), dtype=torch.float64)     # B, before bias correction
        self.gaps_seen = torch.zeros((hashes, buckets), dtype=torch.int64)     # n
        self.step = 0                                                          # examples seen so far
        self.distinct = torch.zeros(hashes, dtype=torch.int64)                 # buckets seen, per hash (G₀)

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, hashes) bucket of each 63-bit item key under each hash function."""
        k = keys.numpy().astype(np.uint64)
        cols = [splitmix64(k + np.uint64(j * 0x632BE59BD9B4E019 % 2**64)) % np.uint64(self.buckets)
                for j in range(self.hashes)]
        return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))

    def update(self, keys: torch.Tensor) -> None:
        """Record one batch of occurrences, in stream order: keys (n,) int64 item keys."""
        n = int(keys.shape[0])
        if n == 0:
            return
        positions = torch.arange(self.step, self.step + n, dtype=torch.int64)
        rows = self.rows(keys)
        for j in range(self.hashes):
            self._update_one(j, rows[:, j], positions)
        self.step += n

    def _update_one(self, j: int, rows: torch.Tensor, positions: torch.Tensor) -> None:
        uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
        m = uniq.shape[0]
        last = torch.full((m,), -1, dtype=torch.int64).scatter_reduce_(0, inverse, positions, "amax")
        first = torch.full((m,), 2**62, dtype=torch.int64).scatter_reduce_(0, inverse, positions, "amin")
        prev = self.last_seen[j, uniq]
        seen = prev >= 0
        self.distinct[j] += int((~seen).sum())
        n_gaps = torch.where(seen, counts, counts - 1)
        span = torch.where(seen, last - prev, last - first)
        ok = n_gaps > 0
        mean_gap = span[ok].double() / n_gaps[ok].double()
        decay = (1.0 - self.alpha) ** n_gaps[ok].double()
        target = uniq[ok]
        self.gap_ema[j, target] = decay * self.gap_ema[j, target] + (1.0 - decay) * mean_gap
        self.gaps_seen[j, target] += n_gaps[ok]
        self.last_seen[j, uniq] = last

    def probability(self, keys: torch.Tensor) -> torch.Tensor:
        """(n,) float32 p̂ of each item key, clipped to [p_min, 1]."""
        rows = self.rows(keys)
        gap = torch.zeros(rows.shape[0], dtype=torch.float64)
        for j in range(self.hashes):
            r = rows[:, j]
            n = self.gaps_seen[j, r]
            w = (1.0 - self.alpha) ** n.double()
            if self.prior_gaps > 0:
                # The prior as one more (decaying) term of the EMA: see the module docstring.
                prior = self.prior_gaps * self.alpha * w
                g0 = float(max(int(self.distinct[j]), 1))
                corrected = (self.gap_ema[j, r] + prior * g0) / (1.0 - w + prior)
            else:
                corrected = self.gap_ema[j, r] / (1.0 - w).clamp_min(1e-300)
                corrected = torch.where(n > 0, corrected, torch.full_like(corrected, float("inf")))
            last = self.last_seen[j, r]
            stale = torch.where(last >= 0, (self.step - 1 - last).double() / _STALE_FACTOR, torch.zeros_like(corrected))
            gap = torch.maximum(gap, torch.maximum(corrected, stale))
        return (1.0 / gap).clamp(self.p_min, 1.0).float()

    # ---- checkpoint state ------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {"A": self.last_seen, "B": self.gap_ema, "n": self.gaps_seen,
                "step": torch.tensor([self.step], dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        shape = (self.hashes, self.buckets)
        expected = {"A": torch.int64, "B": torch.float64, "n": torch.int64}
        for name, dtype in expected.items():
            t = state.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                raise ModelError(f"estimator state {name!r} must be {dtype} of shape {shape}")
        self.last_seen = state["A"].clone()
        self.gap_ema = state["B"].clone()
        self.gaps_seen = state["n"].clone()
        self.step = int(state["step"][0])
        self.distinct = (self.last_seen >= 0).sum(dim=1)
