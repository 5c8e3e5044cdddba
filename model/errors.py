"""Errors raised by the learning core. All derive from :class:`ModelError`."""

from __future__ import annotations

from streamrecall.errors import StreamrecallError


class ModelError(StreamrecallError):
    """Base of every error raised by ``streamrecall.model``."""


class ModelConfigError(ModelError):
    """A :class:`~streamrecall.model.config.ModelConfig` field has a bad value; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CheckpointError(ModelError):
    """A checkpoint cannot be read, or was written for an incompatible configuration."""


class ModelUpdateError(ModelError):
    """A model-update payload is malformed, unsafe, or does not fit this model."""


class ModelUpdateRefused(ModelUpdateError):
    """A well-formed update this replica will not apply: from an older fencing epoch than one it
    applied (``stale-epoch``) or an implausible version jump (``version-jump``). ``reason`` is the
    dead-letter reason and metric label."""

    REASONS = ("stale-epoch", "version-jump")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
