"""Safe tensor files: safetensors for tensors, one JSON document in its metadata.

Nothing here unpickles. Files are written with ``streamrecall.atomicfile.atomic_write``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError


#: The metadata key under which our JSON document travels.
META_KEY = "streamrecall"


class SafeIOError(ValueError):
    """The bytes are not a well-formed safetensors document of ours."""


def dumps(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """Serialise tensors (made contiguous) with ``header`` as JSON metadata."""
    plain = {k: v.detach().contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(plain, metadata={META_KEY: json.dumps(header, separators=(",", ":"))})


def read_layout(data: bytes) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The tensor table (name → {dtype, shape, data_offsets}) and our JSON header, checked
    for well-formedness only; no tensor is materialised. Any input that is not that raises
    :class:`SafeIOError`, never another error."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SafeIOError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise SafeIOError(f"{len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise SafeIOError(f"header length {n} does not fit a payload of {len(data)} bytes")
    table = _json("header", data[8:8 + n])
    if not isinstance(table, dict):
        raise SafeIOError("header is not a JSON object")
    meta = table.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str):
        raise SafeIOError(f"metadata key {META_KEY!r} is missing")
    header = _json(f"metadata {META_KEY!r}", meta[META_KEY])
    if not isinstance(header, dict):
        raise SafeIOError(f"metadata {META_KEY!r} is not a JSON object")
    for name, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) \
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"]):
            raise SafeIOError(f"tensor {name!r} has a malformed entry")
    return table, header


def _json(what: str, text: bytes | str) -> Any:
    """``json.loads`` that raises only :class:`SafeIOError`. Besides JSONDecodeError, json.loads
    raises plain ValueError on an integer of more than 4,300 digits (and on undecodable bytes)
    and RecursionError on deep nesting: untrusted bytes can hold either."""
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise SafeIOError(f"{what} is not JSON we accept: {exc}") from None
    except RecursionError:
        raise SafeIOError(f"{what} is JSON nested too deeply") from None


def loads(data: bytes) -> dict[str, torch.Tensor]:
    """Materialise the tensors (safetensors checks offsets and sizes)."""
    try:
        return safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as exc:
        raise SafeIOError(f"invalid safetensors payload: {exc}") from None


