"""Errors raised by :mod:`streamrecall.index`, all derived from one base class."""

from __future__ import annotations

from streamrecall.errors import StreamrecallError


class IndexStoreError(StreamrecallError):
    """Base of every error raised by the item index."""


class InvalidInputError(IndexStoreError, ValueError):
    """Ids, vectors or metadata handed to the index are malformed; the message says how."""


class SnapshotError(IndexStoreError):
    """A snapshot could not be written, or the one on disk cannot be loaded."""


class RebuildInProgressError(IndexStoreError):
    """A second rebuild was started while one is still building."""
