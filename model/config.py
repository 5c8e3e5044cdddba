"""The one settings object of the learning core, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from streamrecall.model.errors import ModelConfigError

#: Fields that fix tensor shapes or the seeded initial weights. A checkpoint or a model
#: update is only compatible with a model whose structural fields are equal.
STRUCTURAL_FIELDS = ("dim", "hidden", "id_buckets", "token_buckets", "max_tokens", "seed", "tower")

#: τ by tower when ``temperature`` is None, each the best measured (docs/model.md): the two towers
#: score cosines in [−1, 1]; the FM's inner products are unbounded and learn their own scale.
DEFAULT_TEMPERATURE = {"two_tower": 0.05, "fm": 0.2}


@dataclass(frozen=True)
class ModelConfig:
    """Every knob of the towers, the estimator, the loss and the trainer (see docs/model.md)."""

    tower: Literal["two_tower", "fm"] = "fm"  # the recall model family (docs/model.md, "FM recall")
    dim: int = 64                      # embedding size of both towers and of every table row
    hidden: int = 128                  # width of the one hidden layer of each tower
    id_buckets: int = 1_000_000        # rows of the item-id table and of the user-id table
    token_buckets: int = 1 << 18       # rows of the content-token table (categories, tags, title, features)
    max_tokens: int = 64               # content tokens kept per item (categories first, then tags, title)
    history_len: int = 20              # last N clicked items pooled into the user tower
    history_pooling: Literal["mean", "decay"] = "mean"  # decay: weight 2^(-age/history_half_life), newest age 0
    history_half_life: float = 5.0     # clicks after which a history item counts half (history_pooling="decay")
    temperature: float | None = None   # softmax temperature τ; None: the tower's own (DEFAULT_TEMPERATURE)
    logq: bool = True                  # subtract log q from every logit (sampling-bias correction)
    logq_alpha: float = 1.0            # strength α: logit − α·log q (1: the full correction, 0: same as logq off)
    p_min: float = 1e-6                # p̂ is clipped to [p_min, 1] before the log
    estimator_alpha: float = 0.01      # learning rate α of the gap EMA (Yi et al. Alg. 2)
    estimator_buckets: int = 1 << 20   # size of the estimator arrays A and B
    estimator_hashes: int = 1          # >1: Algorithm 3, p̂ from the largest gap over the hashes
    estimator_prior_gaps: float = 1.0  # weight (in gaps) of the prior gap a cold item's p̂ is shrunk toward; 0: off
    sparse_optimizer: Literal["rowwise_adagrad", "sgd"] = "rowwise_adagrad"
    lr_sparse: float = 0.05            # rate of the sparse tables' optimiser (sgd: per example, × batch size)
    lr_dense: float = 2e-3             # Adam/Adagrad on the dense layers
    dense_optimizer: Literal["adam", "adagrad"] = "adam"
    mixed_negatives: int = 0           # extra uniformly sampled negatives per batch (0: in-batch only)
    downsample_top: float | None = None  # keep clicks with p̂ > t with probability sqrt(t / p̂)
    trending_size: int = 200           # (item_id, score) pairs shipped in every model update
    trending_half_life: float = 200_000.0  # examples after which a click counts half in trending
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "id_buckets", "token_buckets", "max_tokens", "history_len",
                     "estimator_buckets", "estimator_hashes", "trending_size"):
            _positive_int(name, getattr(self, name))
        if self.tower not in ("two_tower", "fm"):
            raise ModelConfigError("tower", f"must be 'two_tower' or 'fm', got {self.tower!r}")
        if self.tower == "fm" and self.dim < 2:
            raise ModelConfigError("dim", "must be >= 2 with tower='fm' (one column holds the first-order terms)")
        if self.history_pooling not in ("mean", "decay"):
            raise ModelConfigError("history_pooling", f"must be 'mean' or 'decay', got {self.history_pooling!r}")
        if self.temperature is not None:
            _positive_float("temperature", self.temperature)
        for name in ("lr_sparse", "lr_dense", "trending_half_life", "history_half_life"):
            _positive_float(name, getattr(self, name))
        if not isinstance(self.logq, bool):
            raise ModelConfigError("logq", f"must be a bool, got {self.logq!r}")
        _non_negative_float("logq_alpha", self.logq_alpha)
        _non_negative_float("estimator_prior_gaps", self.estimator_prior_gaps)
        _positive_float("p_min", self.p_min)
        if self.p_min >= 1.0:
            raise ModelConfigError("p_min", f"must be < 1, got {self.p_min!r}")
        _positive_float("estimator_alpha", self.estimator_alpha)
        if self.estimator_alpha >= 1.0:
            raise ModelConfigError("estimator_alpha", f"must be in (0, 1), got {self.estimator_alpha!r}")
        if self.sparse_optimizer not in ("rowwise_adagrad", "sgd"):
            raise ModelConfigError("sparse_optimizer", f"must be 'rowwise_adagrad' or 'sgd', got {self.sparse_optimizer!r}")
        if self.dense_optimizer not in ("adam", "adagrad"):
            raise ModelConfigError("dense_optimizer", f"must be 'adam' or 'adagrad', got {self.dense_optimizer!r}")
        if isinstance(self.mixed_negatives, bool) or not isinstance(self.mixed_negatives, int) \
                or self.mixed_negatives < 0:
            raise ModelConfigError("mixed_negatives", f"must be an int >= 0, got {self.mixed_negatives!r}")
        if self.downsample_top is not None:
            _positive_float("downsample_top", self.downsample_top)
            if self.downsample_top >= 1.0:
                raise ModelConfigError("downsample_top", f"must be in (0, 1) or None, got {self.downsample_top!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ModelConfigError("seed", f"must be an int in [0, 2**63), got {self.seed!r}")

    @property
    def softmax_temperature(self) -> float:
        """τ of the loss: ``temperature``, or the tower's default when it is None."""
        return DEFAULT_TEMPERATURE[self.tower] if self.temperature is None else self.temperature

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict (e.g. a checkpoint header); unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(unknown[0], "unknown setting")
        return cls(**data)

    def structural(self) -> dict[str, Any]:
        """The fields that must match between a trainer and the replicas/checkpoints it talks to."""
        return {name: getattr(self, name) for name in STRUCTURAL_FIELDS}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(name, f"must be a positive int, got {value!r}")


def _non_negative_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ModelConfigError(name, f"must be a finite number >= 0, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelConfigError(name, f"must be a finite number > 0, got {value!r}")
