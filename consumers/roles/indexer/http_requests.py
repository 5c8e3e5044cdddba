"""Decoding and validating the recall API's requests (docs/api.md): bytes in, typed requests out.

Every way a request can be wrong ends here as an :class:`ApiError` with a 4xx status and a
message that says what to fix. Bodies are decoded by msgspec into typed structs, so a wrong
type is refused at the first wrong byte, whatever follows it (50,000 nested arrays where a
number belongs fail at depth two); what msgspec cannot know (``k`` against ``max_k``, the
index's dimension, finiteness, list lengths) is checked after. Unknown fields are refused: a
misspelt ``max_per_category`` silently ignored would return uncapped answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import parse_qs

import msgspec
import numpy as np

from streamrecall.consumers.roles.indexer.http_api import ApiError

#: Query-string parameters any route takes, at most (parse_qs stops at this many fields).
MAX_QUERY_FIELDS = 16


class VectorBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /recall``."""

    vector: Union[list[float], None] = None
    k: Union[int, None] = None
    max_per_category: Union[int, None] = None
    exclude: list[str] = []


class BatchQuery(msgspec.Struct, forbid_unknown_fields=True):
    """One query of ``POST /recall/batch``: a user or a vector, with optional overrides."""

    user_id: Union[str, None] = None
    vector: Union[list[float], None] = None
    k: Union[int, None] = None
    max_per_category: Union[int, None] = None
    exclude_seen: Union[bool, None] = None
    exclude: Union[list[str], None] = None


class BatchBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /recall/batch``: ``k``, ``max_per_category`` and ``exclude_seen`` apply to every query
    that does not give its own."""

    queries: Union[list[BatchQuery], None] = None
    k: Union[int, None] = None
    max_per_category: Union[int, None] = None
    exclude_seen: bool = False


@dataclass(frozen=True)
class UserRecall:
    user_id: str
    k: int
    exclude_seen: bool
    max_per_category: int | None


@dataclass(frozen=True)
class VectorRecall:
    vector: np.ndarray
    k: int
    max_per_category: int | None
    exclude: tuple[str, ...]


RecallRequest = Union[UserRecall, VectorRecall]

_VECTOR_DECODER = msgspec.json.Decoder(VectorBody)
_BATCH_DECODER = msgspec.json.Decoder(BatchBody)


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the index's dimension and the configured bounds."""

    dim: int
    max_k: int
    max_batch: int


def decode(decoder: msgspec.json.Decoder, raw: bytes, shape: str) -> Any:
    """``raw`` decoded by ``decoder``; every failure a 400 naming where the body went wrong."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`") and " - at `" not in str(exc):  # the top level is not an object
            raise ApiError(400, f"body must be a JSON object: {shape}") from None
        raise ApiError(400, f"body: {exc} (expected {shape})") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:  # nesting in a field msgspec skips without a type to stop it
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None


def vector_request(raw: bytes, limits: Limits) -> VectorRecall:
    body = decode(_VECTOR_DECODER, raw, '{"vector": [...], "k": K}')
    k_ = k(body.k, limits.max_k, "k")
    cap = positive(body.max_per_category, "max_per_category")
    return VectorRecall(vector(body.vector, limits.dim, "vector"), k_, cap,
                        exclusions(body.exclude, limits.max_k, "exclude"))


def batch_request(raw: bytes, limits: Limits) -> list[RecallRequest]:
    """The batch's queries, each with its options resolved against the batch's defaults."""
    body = decode(_BATCH_DECODER, raw, '{"queries": [{"user_id": U} | {"vector": [...]}, ...], "k": K}')
    if not body.queries:
        raise ApiError(400, 'queries is required: a non-empty list of {"user_id": U} or {"vector": [...]}')
    if len(body.queries) > limits.max_batch:
        raise ApiError(413, f"{len(body.queries)} queries is above the limit of {limits.max_batch} per batch")
    default_cap = positive(body.max_per_category, "max_per_category")
    out: list[RecallRequest] = []
    for n, q in enumerate(body.queries):
        where = f"queries[{n}]"
        k_n = k(q.k if q.k is not None else body.k, limits.max_k, f"{where}.k (or k)")
        cap = positive(q.max_per_category, f"{where}.max_per_category") if q.max_per_category is not None \
            else default_cap
        if (q.user_id is None) == (q.vector is None):
            raise ApiError(400, f"{where}: give exactly one of user_id or vector")
        if q.user_id is not None:
            if q.exclude is not None:
                raise ApiError(400, f"{where}.exclude applies to vector queries; users take exclude_seen")
            out.append(UserRecall(user_id(q.user_id, where), k_n,
                                  body.exclude_seen if q.exclude_seen is None else q.exclude_seen, cap))
        else:
            if q.exclude_seen is not None:
                raise ApiError(400, f"{where}.exclude_seen applies to user queries; vectors take exclude")
            out.append(VectorRecall(vector(q.vector, limits.dim, f"{where}.vector"), k_n, cap,
                                    exclusions(q.exclude or [], limits.max_k, f"{where}.exclude")))
    return out


def user_request(query_string: bytes, limits: Limits) -> UserRecall:
    """``GET /recall?user_id=U&k=K[&exclude_seen=1][&max_per_category=N]``."""
    query = query_params(query_string)
    uid = one(query, "user_id")
    if not uid:
        raise ApiError(400, "user_id is required (GET /recall?user_id=U&k=K); to query by vector, POST /recall")
    return UserRecall(user_id(uid, "user_id"), k(int_param(one(query, "k"), "k"), limits.max_k, "k"),
                      flag("exclude_seen", one(query, "exclude_seen")),
                      positive(int_param(one(query, "max_per_category"), "max_per_category"), "max_per_category"))


# ------------------------------------------------------------------------------- pieces
def query_params(query_string: bytes) -> dict[str, list[str]]:
    try:
        return parse_qs(query_string.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS,
                        errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the query string is not UTF-8") from None
    except ValueError:  # parse_qs: too many fields
        raise ApiError(400, f"the query string has more than {MAX_QUERY_FIELDS} parameters") from None


def one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{name} is given {len(values)} times")
    return values[0]


def int_param(raw: str | None, name: str) -> int | None:
    """A query-string integer: ASCII digits only (``int()`` takes '٣' and '1_000', ``isdigit`` '²')."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ApiError(400, f"{name} must be a positive integer, got {raw[:40]!r}")
    return int(text)


def positive(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise ApiError(400, f"{name} must be a positive integer, got {value!r}")
    return value


def k(value: int | None, max_k: int, name: str) -> int:
    if value is None:
        raise ApiError(400, f"{name} is required (a positive integer)")
    positive(value, name)
    if value > max_k:
        raise ApiError(400, f"{name}={value} is above the limit of {max_k}")
    return value


def flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", ""):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ApiError(400, f"{name} must be 1 or 0, got {raw[:40]!r}")


def user_id(value: str, name: str) -> str:
    if not value or len(value) > 1024:
        raise ApiError(400, f"{name} must be a non-empty id of at most 1024 characters")
    return value


def vector(raw: list[float] | None, dim: int, name: str) -> np.ndarray:
    if raw is None:
        raise ApiError(400, f"{name} is required: a list of {dim} numbers")
    if len(raw) != dim:
        raise ApiError(400, f"{name} has {len(raw)} values; the index holds {dim}-d vectors")
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, refused just below
        out = np.asarray(raw, dtype=np.float32)
    if not np.isfinite(out).all():  # also catches doubles that overflow float32
        raise ApiError(400, f"{name} values must be finite (no NaN or Infinity; within float32 range)")
    return out


def exclusions(ids: list[str], max_k: int, name: str) -> tuple[str, ...]:
    """At most ``max_k`` ids: each one widens the search, so the bound is the one ``k`` has."""
    if len(ids) > max_k:
        raise ApiError(400, f"{name} lists {len(ids)} ids; at most {max_k} (max_k) may be excluded")
    return tuple(ids)
