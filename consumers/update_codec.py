"""A model update's bytes, checked: its size bound, its signature, its decoding (never pickle).

The one decoder of ``model-updates`` payloads (:class:`ModelUpdateDecoder`), used by every reader
through the one assembler (``consumers/updates.py``), and the signing the trainer applies."""

from __future__ import annotations

import hashlib
import hmac

from streamrecall.consumers.deadletter import headers_dict

# The header names are re-exported here: this module is where readers and writers find them.
from streamrecall.consumers.update_chunks import HEADER_EPOCH, HEADER_KIND, HEADER_SIGNATURE, HEADER_VERSION
from streamrecall.events import InvalidEvent
from streamrecall.model import ModelConfig, ModelUpdate, ModelUpdateError, decode_update
from streamrecall.model.update import DEFAULT_MAX_UPDATE_BYTES, max_update_bytes
from streamrecall.settings import Secret, Settings

#: Dead-letter reasons (and streamrecall_model_updates_refused_total labels) of the signature check.
SIGNATURE_REASONS = ("unsigned", "bad-signature")


def update_max_bytes(settings: Settings, config: ModelConfig) -> int:
    """The most bytes a reader assembles of one update: ``model_update_max_bytes``, by default the
    largest update ``config``'s model can produce (so every genuine update fits)."""
    if settings.model_update_max_bytes is not None:
        return settings.model_update_max_bytes
    return max_update_bytes(config.structural())


def sign_update(key: Secret, data: bytes) -> str:
    """The hex HMAC-SHA256 of an update's payload bytes under ``key``."""
    return hmac.new(key.reveal().encode(), data, hashlib.sha256).hexdigest()


def check_signature(key: Secret, data: bytes, headers: list[tuple[str, bytes | None]] | None) -> None:
    """Raise :class:`InvalidEvent` (``unsigned`` or ``bad-signature``) unless the record's signature
    header is the HMAC of ``data`` under ``key``. Compared in constant time."""
    given = headers_dict(headers).get(HEADER_SIGNATURE)
    if not given:
        raise InvalidEvent("unsigned", "model update has no signature header; model_signing_key is set, so "
                                       "only updates signed with it are applied")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), sign_update(key, data).encode()):
        raise InvalidEvent("bad-signature", "model update signature does not match its bytes under "
                                            "model_signing_key (forged, corrupted, or signed with another key)")


def decode_model_update(value: bytes | None, max_bytes: int = DEFAULT_MAX_UPDATE_BYTES, *,
                        headers: list[tuple[str, bytes | None]] | None = None,
                        signing_key: Secret | None = None) -> ModelUpdate:
    """The one decoder of an assembled model-update payload (:class:`ModelUpdateStream` calls it for
    every reader): an update, or :class:`InvalidEvent` with a reason (``null``, ``invalid``, and
    with a ``signing_key`` ``unsigned``/``bad-signature``, checked before any parsing) to
    dead-letter. ``headers`` are the commit record's (the signature)."""
    if value is None:
        raise InvalidEvent("null", "model update is null")
    if signing_key is not None:
        check_signature(signing_key, bytes(value), headers)
    try:
        return decode_update(value, max_bytes=max_bytes)
    except ModelUpdateError as exc:
        raise InvalidEvent("invalid", f"model update: {exc}") from None


class ModelUpdateDecoder:
    """:func:`decode_model_update` bound to a size limit and signing key, called with the commit
    record's headers (``uses_headers``, as :func:`~streamrecall.consumers.runtime.decode_value` does)."""

    uses_headers = True

    def __init__(self, signing_key: Secret | None = None, max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> None:
        self.signing_key = signing_key
        self.max_bytes = max_bytes

    def __call__(self, value: bytes | None, headers: list[tuple[str, bytes | None]] | None = None) -> ModelUpdate:
        return decode_model_update(value, self.max_bytes, headers=headers, signing_key=self.signing_key)


def update_headers(kind: str, version: int, trainer_epoch: int = 0,
                   signature: str | None = None) -> list[tuple[str, bytes]]:
    """The headers of an update sent as one record without chunk headers (read as chunk ``0/1``)."""
    headers = [(HEADER_KIND, kind.encode()), (HEADER_VERSION, str(version).encode()),
               (HEADER_EPOCH, str(trainer_epoch).encode())]
    if signature is not None:
        headers.append((HEADER_SIGNATURE, signature.encode()))
    return headers
