"""The retrieval loss: in-batch sampled softmax with logQ correction (Yi et al. 2019).

Kept apart from the towers: it takes embeddings and returns a scalar.

Shapes: B examples, M extra negatives, d embedding size.

- ``user`` (B, d), ``item`` (B, d): unit vectors; row i of each is a positive pair.
- ``item_keys`` (B,) int64: the positives' item keys; equal keys mean the same item.
- ``log_q`` (B,) float: log of each in-batch candidate's sampling probability (units
  below), or None.
- ``weights`` (B,) float ≥ 0: per-example weights (a click's ``weight``), or None.
- ``neg_item`` (M, d), ``neg_keys`` (M,), ``neg_log_q`` (M,): extra negatives (mixed
  negative sampling, Yang et al. 2020), or None.

Data-parallel steps (``model/data_parallel.py``) pass one rank's rows against every rank's
columns: ``item`` (C, d) with C ≥ B, row i's positive is column ``positive_offset + i``,
``item_keys`` and ``log_q`` are (C,), and ``weight_total`` is the global batch's Σ w, so the
ranks' losses sum to the loss of the whole batch. The defaults are the one-process case.

logit[i, j] = ⟨user_i, item_j⟩ / τ − log_q[j]. The correction is applied to every
column, the positive's included. A column j ≠ i holding the same item as row i's
positive (an *accidental hit*) is masked out: it is not a negative for row i. The loss
is Σ_i w_i · (−log softmax(logit[i])[i]) / Σ_i w_i.

Units of log_q: the columns must agree. With in-batch negatives only, any constant
drops out. When mixing, the B batch columns and the M extra ones are one pool of
candidates, so every column's log_q is the log of its item's expected occurrences in the
whole pool: log(B·q + M/N) for an item of in-batch proposal q (per column) and M uniform
draws from N items, the same formula for the batch columns (``log_q``) and the extra
ones (``neg_log_q``). One term per source (log(B·q) for one, log(M/N) for the other)
under-states the proposal of every item, and most for a tail item that the uniform draws
reach far more often than the batch. The trainer also scales log_q by its
``logq_alpha`` (0 < α ≤ 1 weakens the correction); this function subtracts what it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamrecall.model.errors import ModelError


def sampled_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    *,
    temperature: float,
    item_keys: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    neg_item: torch.Tensor | None = None,
    neg_keys: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    positive_offset: int = 0,
    weight_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted mean loss over the batch (a 0-d tensor). See the module docstring."""
    b, c = user.shape[0], item.shape[0]
    if user.dim() != 2 or item.dim() != 2 or item.shape[1] != user.shape[1]:
        raise ModelError(f"user and item must be (B, d) and (C, d); got {tuple(user.shape)} and {tuple(item.shape)}")
    if not 0 <= positive_offset <= c - b:
        raise ModelError(f"item (C, d) needs a column for each of the B={b} rows of user (B, d) from "
                         f"positive_offset={positive_offset}; got C={c}")
    positives = torch.arange(positive_offset, positive_offset + b)
    logits = user @ item.T / temperature                      # (B, C)
    if log_q is not None:
        logits = logits - log_q.reshape(1, c)
    row_keys = None
    if item_keys is not None:
        row_keys = item_keys[positive_offset:positive_offset + b]
        hits = row_keys.reshape(b, 1) == item_keys.reshape(1, c)
        hits[torch.arange(b), positives] = False
        logits = logits.masked_fill(hits, float("-inf"))
    if neg_item is not None and neg_item.shape[0] > 0:
        neg = user @ neg_item.T / temperature                 # (B, M)
        if neg_log_q is not None:
            neg = neg - neg_log_q.reshape(1, -1)
        if row_keys is not None and neg_keys is not None:
            neg = neg.masked_fill(row_keys.reshape(b, 1) == neg_keys.reshape(1, -1), float("-inf"))
        logits = torch.cat([logits, neg], dim=1)              # (B, C + M)
    per_example = F.cross_entropy(logits, positives, reduction="none")  # (B,)
    if weights is None:
        return per_example.mean()
    total = weights.sum() if weight_total is None else weight_total
    if total <= 0:
        return per_example.sum() * 0.0
    return (per_example * weights).sum() / total
