"""The model-update payload: what travels on the ``model-updates`` topic.

A safetensors document (no pickle) whose metadata key ``streamrecall`` holds a JSON
header::

    {"format": "streamrecall.model-update", "format_version": 1,
     "version": 7, "base_version": 6, "kind": "delta", "dense_changed": false,
     "model": {"dim": 64, "hidden": 128, "id_buckets": ..., "token_buckets": ..., "max_tokens": 64, "seed": 0,
               "tower": "two_tower"},
     "steps": 12345, "created_at_ms": 1700000000000, "trained_through_ms": 1700000000000,
     "trainer_epoch": 3, "trending": [["item-42", 0.0123], ...]}

``trainer_epoch`` is the fencing epoch of the trainer process that wrote the update (docs/security.md):
replicas refuse updates from an older epoch than one they applied. It is inside the payload, so
a signature over the payload's bytes covers it.

``model.tower`` is ``"two_tower"`` or ``"fm"`` (absent in updates written before FM existed: read as
``"two_tower"``). The FM has no dense layers: its full updates say ``dense_changed`` and carry no
``dense/`` tensor, its deltas never change dense layers.

Tensors: ``dense/<name>`` (float32, every dense parameter of the tower family) when ``dense_changed``;
``rows/<table>`` (int64, n) and ``values/<table>`` (float32, n × dim) for each sparse
table (``item_id``, ``user_id``, ``token``) with changed rows.

Kinds. A **full** update carries the dense layers and every row that differs from the
seeded initial weights (a replica resets to those, then applies). A **delta** carries
the rows changed since the previous update, ``base_version``, and the dense layers only
if they changed. A fresh consumer starts from the last full update, then applies the
deltas whose ``base_version`` chains to it, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from streamrecall.model.errors import ModelUpdateError
from streamrecall.model.safeio import SafeIOError, dumps, loads, read_layout
from streamrecall.model.towers import TABLES

FORMAT = "streamrecall.model-update"
FORMAT_VERSION = 1
#: Payloads larger than this are refused before parsing.
DEFAULT_MAX_UPDATE_BYTES = 512 * 1024 * 1024
MAX_TRENDING = 10_000
_STRUCTURAL_KEYS = ("dim", "hidden", "id_buckets", "token_buckets", "max_tokens", "seed")
TOWERS = ("two_tower", "fm")
_DTYPES = {"F32": torch.float32, "I64": torch.int64}


@dataclass(frozen=True)
class SparseRows:
    """Changed rows of one table: rows (n,) int64 unique, values (n, dim) float32."""

    rows: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class ModelUpdate:
    version: int
    base_version: int
    kind: Literal["full", "delta"]
    dense_changed: bool
    model: dict[str, Any]  # the structural settings: ints, and "tower"
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    sparse: dict[str, SparseRows] = field(default_factory=dict)
    trending: list[tuple[str, float]] = field(default_factory=list)
    steps: int = 0
    created_at_ms: int = 0
    trained_through_ms: int = 0  # newest click event time the model has trained on (0: unknown)
    trainer_epoch: int = 0  # the writing trainer process's fencing epoch (0: written before epochs existed)

    def changed_rows(self, table: str) -> torch.Tensor:
        """(n,) int64 rows of ``table`` carried by this update (empty if none)."""
        part = self.sparse.get(table)
        return part.rows if part is not None else torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class ChangedRows:
    """The sparse rows one or several updates moved, by table, without their values: what decides
    which items and users they touched (``TowerReplica.items_touched``) and how far each item's
    vector may have moved (``TowerReplica.items_drift``). A queued re-encode keeps this, not the
    update: at a million items a rebuild takes minutes, and the deltas queued meanwhile held every
    changed row's values (MBs each).

    ``shift[table]`` (float32, aligned with ``rows[table]``) is how far each row moved: the L2 norm
    of its change, summed over merged updates (so an upper bound on the net move). A table without
    ``shift`` moved by an unknown amount (read as infinitely far)."""

    rows: dict[str, torch.Tensor]
    shift: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: Literal["delta"] = "delta"
    dense_changed: bool = False

    @classmethod
    def of(cls, *updates: "ModelUpdate | ChangedRows") -> "ChangedRows":
        """The union of the rows ``updates`` changed (delta updates without a dense change, or
        ``ChangedRows``); shifts add up, and a row of a table without shifts moved unknowably far."""
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for update in updates:
            if update.kind != "delta" or update.dense_changed:
                raise ValueError(f"{update.kind} update with dense_changed={update.dense_changed}: "
                                 "it touches everything, not rows")
            names = update.rows if isinstance(update, ChangedRows) else update.sparse
            for name in names:
                rows = update.changed_rows(name)
                shift = update.shift.get(name) if isinstance(update, ChangedRows) else None
                if shift is None:
                    shift = torch.full((rows.numel(),), math.inf)
                parts.setdefault(name, []).append((rows, shift))
        rows_by, shift_by = {}, {}
        for name, pieces in parts.items():
            rows, inverse = torch.unique(torch.cat([r for r, _ in pieces]), return_inverse=True)
            rows_by[name] = rows
            shift_by[name] = torch.zeros(rows.numel()).index_add_(0, inverse, torch.cat([s for _, s in pieces]))
        return cls(rows_by, shift_by)

    def changed_rows(self, table: str) -> torch.Tensor:
        """(n,) int64 rows of ``table`` changed (empty if none)."""
        rows = self.rows.get(table)
        return rows if rows is not None else torch.zeros(0, dtype=torch.int64)

    def row_shift(self, table: str, size: int) -> torch.Tensor:
        """(size,) float32: each row's shift in ``table`` (0 for rows not changed)."""
        out = torch.zeros(size)
        rows = self.changed_rows(table)
        if rows.numel():
            shift = self.shift.get(table)
            out[rows] = shift if shift is not None else math.inf
        return out


def dense_shapes(model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The expected dense parameter shapes for structural settings ``model`` (none for the FM)."""
    d, h = model["dim"], model["hidden"]
    shapes: dict[str, tuple[int, ...]] = {}
    if model.get("tower", "two_tower") == "fm":
        return shapes
    for tower in ("item", "user"):
        shapes |= {f"{tower}.mlp.0.weight": (h, 2 * d), f"{tower}.mlp.0.bias": (h,),
                   f"{tower}.mlp.2.weight": (d, h), f"{tower}.mlp.2.bias": (d,)}
    return shapes


def table_rows(model: dict[str, Any], table: str) -> int:
    return model["token_buckets"] if table == "token" else model["id_buckets"]


#: Room for the safetensors tensor table and our JSON header (trending holds up to MAX_TRENDING pairs).
HEADER_ALLOWANCE = 16 * 1024 * 1024


def max_update_bytes(model: dict[str, int]) -> int:
    """The largest payload a model of structural settings ``model`` can produce: a full update
    holding every row of every table (int64 index + float32 values) and the dense layers."""
    row_bytes = 8 + 4 * model["dim"]
    rows = sum(table_rows(model, table) for table in TABLES)
    dense = sum(math.prod(shape) for shape in dense_shapes(model).values())
    return rows * row_bytes + 4 * dense + HEADER_ALLOWANCE


def encode_update(update: ModelUpdate) -> bytes:
    """Serialise ``update`` (validated the same way decoding validates it)."""
    tensors: dict[str, torch.Tensor] = {f"dense/{k}": v.float() for k, v in update.dense.items()}
    for table, part in update.sparse.items():
        if part.rows.numel():
            tensors[f"rows/{table}"] = part.rows.long()
            tensors[f"values/{table}"] = part.values.float()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": update.version,
              "base_version": update.base_version, "kind": update.kind, "dense_changed": update.dense_changed,
              "model": dict(update.model), "steps": update.steps, "created_at_ms": update.created_at_ms,
              "trained_through_ms": update.trained_through_ms, "trainer_epoch": update.trainer_epoch,
              "trending": [[k, float(v)] for k, v in update.trending]}
    data = dumps(tensors, header)
    # Refuse to publish what a consumer would refuse; the size limit is the reader's setting.
    decode_update(data, max_bytes=len(data))
    return data


def decode_update(data: bytes, *, max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> ModelUpdate:
    """Parse and validate a payload; raises :class:`ModelUpdateError` saying why not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ModelUpdateError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ModelUpdateError(f"payload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        layout, header = read_layout(data)
    except SafeIOError as exc:
        raise ModelUpdateError(str(exc)) from None
    h = _check_header(header)
    model = h["model"]
    for name, entry in layout.items():
        if entry.get("dtype") not in _DTYPES:
            raise ModelUpdateError(f"tensor {name!r} has dtype {_short(entry.get('dtype'))}; only F32 and I64 travel")
    try:
        tensors = loads(data)
    except SafeIOError as exc:
        raise ModelUpdateError(str(exc)) from None
    dense = _check_dense(tensors, model, h["dense_changed"])
    sparse = _check_sparse(tensors, model)
    leftover = sorted(set(tensors) - {f"dense/{k}" for k in dense}
                      - {f"{p}/{t}" for t in sparse for p in ("rows", "values")})
    if leftover:
        raise ModelUpdateError(f"unexpected tensor {leftover[0]!r}")
    return ModelUpdate(version=h["version"], base_version=h["base_version"], kind=h["kind"],
                       dense_changed=h["dense_changed"], model=model, dense=dense, sparse=sparse,
                       trending=h["trending"], steps=h["steps"], created_at_ms=h["created_at_ms"],
                       trained_through_ms=h["trained_through_ms"], trainer_epoch=h["trainer_epoch"])


#: Header integers must fit a signed 64-bit value (Kafka headers, metrics and checkpoints carry them).
_MAX_INT = 2**63 - 1


def _int(header: dict[str, Any], name: str, minimum: int) -> int:
    v = header.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= _MAX_INT:
        raise ModelUpdateError(f"header field {name!r} must be an int from {minimum} to 2**63-1, got {_short(v)}")
    return v


def _finite(x: Any) -> bool:
    """A finite JSON number. math.isfinite raises OverflowError on an int too large for a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _short(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters: a hostile header can hold megabytes, or a
    4,000-digit integer whose repr is refused outright by int-to-str limits."""
    try:
        text = repr(v)
    except ValueError:
        return f"<{type(v).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _check_header(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("format") != FORMAT:
        raise ModelUpdateError(f"header field 'format' must be {FORMAT!r}, got {_short(header.get('format'))}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelUpdateError(f"unsupported format_version {_short(header.get('format_version'))}")
    version = _int(header, "version", 1)
    base = _int(header, "base_version", 0)
    if base >= version:
        raise ModelUpdateError(f"base_version {base} must be below version {version}")
    kind = header.get("kind")
    if kind not in ("full", "delta"):
        raise ModelUpdateError(f"header field 'kind' must be 'full' or 'delta', got {_short(kind)}")
    dense_changed = header.get("dense_changed")
    if not isinstance(dense_changed, bool):
        raise ModelUpdateError(f"header field 'dense_changed' must be a bool, got {_short(dense_changed)}")
    if kind == "full" and not dense_changed:
        raise ModelUpdateError("a full update must carry the dense layers (dense_changed true)")
    model = header.get("model")
    if not isinstance(model, dict):
        raise ModelUpdateError("header field 'model' must be an object")
    checked: dict[str, Any] = {k: _int(model, k, 0 if k == "seed" else 1) for k in _STRUCTURAL_KEYS}
    checked["tower"] = model.get("tower", "two_tower")  # absent: written before FM existed
    if checked["tower"] not in TOWERS:
        raise ModelUpdateError(f"header field 'model.tower' must be one of {TOWERS}, got {_short(checked['tower'])}")
    trending = header.get("trending", [])
    if not isinstance(trending, list) or len(trending) > MAX_TRENDING:
        raise ModelUpdateError(f"header field 'trending' must be a list of at most {MAX_TRENDING} pairs")
    pairs: list[tuple[str, float]] = []
    for pair in trending:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _finite(pair[1])):
            raise ModelUpdateError(f"trending entry {_short(pair)} must be [item_id, finite score]")
        pairs.append((pair[0], float(pair[1])))
    return {"version": version, "base_version": base, "kind": kind, "dense_changed": dense_changed,
            "model": checked, "trending": pairs, "steps": _int(header, "steps", 0),
            "created_at_ms": _int(header, "created_at_ms", 0),
            # optional: updates written before the field existed read as 0 (unknown)
            "trained_through_ms": _int(header, "trained_through_ms", 0) if "trained_through_ms" in header else 0,
            "trainer_epoch": _int(header, "trainer_epoch", 0) if "trainer_epoch" in header else 0}


def _check_dense(tensors: dict[str, torch.Tensor], model: dict[str, Any], dense_changed: bool) -> dict[str, torch.Tensor]:
    present = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
    if not dense_changed:
        if present:
            raise ModelUpdateError("dense tensors present but dense_changed is false")
        return {}
    shapes = dense_shapes(model)
    if set(present) != set(shapes):
        missing = sorted(set(shapes) - set(present)) or sorted(set(present) - set(shapes))
        raise ModelUpdateError(f"dense layers must be exactly {sorted(shapes)}; mismatch at {missing[0]!r}")
    for name, t in present.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shapes[name]:
            raise ModelUpdateError(f"dense/{name} must be float32 {shapes[name]}, got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ModelUpdateError(f"dense/{name} has non-finite values")
    return present


def _check_sparse(tensors: dict[str, torch.Tensor], model: dict[str, Any]) -> dict[str, SparseRows]:
    out: dict[str, SparseRows] = {}
    for table in TABLES:
        rows, values = tensors.get(f"rows/{table}"), tensors.get(f"values/{table}")
        if rows is None and values is None:
            continue
        if rows is None or values is None:
            raise ModelUpdateError(f"table {table!r} needs both rows/ and values/")
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise ModelUpdateError(f"rows/{table} must be a 1-D int64 tensor")
        if values.dtype != torch.float32 or tuple(values.shape) != (rows.shape[0], model["dim"]):
            raise ModelUpdateError(f"values/{table} must be float32 ({rows.shape[0]}, {model['dim']}), "
                                   f"got {values.dtype} {tuple(values.shape)}")
        limit = table_rows(model, table)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= limit):
            raise ModelUpdateError(f"rows/{table} has an index outside [0, {limit})")
        if torch.unique(rows).numel() != rows.numel():
            raise ModelUpdateError(f"rows/{table} has duplicate indices")
        if not torch.isfinite(values).all():
            raise ModelUpdateError(f"values/{table} has non-finite values")
        out[table] = SparseRows(rows, values)
    return out
