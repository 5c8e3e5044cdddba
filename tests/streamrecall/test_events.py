"""The event contract: valid values decode, every kind of bad value is refused with a reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from streamrecall.events import Click, Decoder, InvalidEvent, Item, UserVector, encode, json_schema

SCHEMAS = Path(__file__).parents[2] / "streamrecall" / "schemas"


def test_click_defaults_and_unknown_fields_ignored():
    c = Decoder(Click).decode(b'{"user_id":"u","item_id":"i","ts":5,"extra":{"a":1}}')
    assert c == Click(user_id="u", item_id="i", ts=5, weight=1.0)


def test_item_roundtrip_with_optional_fields():
    item = Item(item_id="i1", created_at=10, title="Red shoes", categories=("shoes",), tags=("red", "sale"),
                features={"price": 9.5}, deleted=False)
    assert Decoder(Item).decode(encode(item)) == item


@pytest.mark.parametrize("value,reason", [
    (b'{"user_id":"u","item_id":"i"', "undecodable"),
    (b"\xff\xfe\x00garbage", "undecodable"),
    (b'{"user_id":"u","ts":5}', "invalid"),
    (b'{"user_id":5,"item_id":"i","ts":5}', "invalid"),
    (b'{"user_id":"u","item_id":"i","ts":5,"weight":1e999}', "invalid"),
    (b'{"user_id":"u","item_id":"i","ts":5,"weight":NaN}', "undecodable"),
    (b'{"user_id":"u","item_id":"i","ts":-1}', "invalid"),
    (b'{"user_id":"","item_id":"i","ts":1}', "invalid"),
    (b"null", "invalid"),
    (None, "null"),
])
def test_bad_clicks_are_refused_with_a_reason(value, reason):
    with pytest.raises(InvalidEvent) as err:
        Decoder(Click).decode(value)
    assert err.value.reason == reason
    assert str(err.value)


def test_oversized_values_are_refused_before_decoding():
    with pytest.raises(InvalidEvent) as err:
        Decoder(Click, max_value_bytes=2048).decode(b"{" + b" " * 4096 + b"}")
    assert err.value.reason == "oversized"


def test_non_finite_item_features_and_vectors_are_invalid():
    with pytest.raises(InvalidEvent):
        Decoder(Item).decode(b'{"item_id":"i","created_at":1,"features":{"x":-1e400}}')
    with pytest.raises(InvalidEvent):
        Decoder(UserVector).decode(b'{"user_id":"u","vector":[1.0,1e999],"model_version":1,'
                                   b'"event_ts":1,"published_at":2,"recent_items":[]}')


@pytest.mark.parametrize("name,event_type", [("items", Item), ("clicks", Click), ("user-vectors", UserVector)])
def test_shipped_json_schemas_match_the_decoders(name, event_type):
    shipped = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    generated = json.loads(json.dumps(json_schema(event_type)))  # tuples become lists, as on disk
    assert {k: v for k, v in shipped.items() if k not in ("$schema", "title")} == generated


def test_json_schema_accepts_a_valid_click_and_rejects_a_missing_field():
    schema = json.loads((SCHEMAS / "clicks.schema.json").read_text())
    jsonschema.validate({"user_id": "u", "item_id": "i", "ts": 1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"user_id": "u", "ts": 1}, schema)


@pytest.mark.parametrize("event_type,value", [
    (Click, b'{"user_id":"u","item_id":"i","ts":18446744073709551615}'),
    (Item, b'{"item_id":"i","created_at":9223372036854775808}'),
    (Item, b'{"item_id":"i","created_at":1,"updated_at":253402300800000}'),
    (UserVector, b'{"user_id":"u","vector":[1.0],"model_version":9223372036854775808,"event_ts":1,"published_at":1}'),
])
def test_times_past_the_year_9999_and_versions_past_int64_are_invalid(event_type, value):
    # The index keeps times and versions in int64 columns: 2**63 there once left a half-written row.
    with pytest.raises(InvalidEvent) as err:
        Decoder(event_type).decode(value)
    assert err.value.reason == "invalid"


NOW_MS = 1_800_000_000_000


def at(now_ms: int, event_type: type) -> Decoder:
    """A decoder allowing a minute ahead of a clock that reads ``now_ms``."""
    return Decoder(event_type, max_ahead_ms=60_000, clock=lambda: now_ms / 1000)


@pytest.mark.parametrize("event_type,value", [
    (Click, b'{"user_id":"u","item_id":"i","ts":%d}' % (NOW_MS + 60_001)),
    (Item, b'{"item_id":"i","created_at":%d}' % (NOW_MS + 86_400_000)),
    (Item, b'{"item_id":"i","created_at":1,"updated_at":%d}' % (NOW_MS + 60_001)),
    (UserVector, b'{"user_id":"u","vector":[1.0],"model_version":1,"event_ts":%d,"published_at":1}' % (NOW_MS + 10**9)),
    (UserVector, b'{"user_id":"u","vector":[1.0],"model_version":1,"event_ts":1,"published_at":%d}' % (NOW_MS + 10**9)),
])
def test_event_times_too_far_ahead_of_the_clock_are_refused_as_future(event_type, value):
    with pytest.raises(InvalidEvent) as err:
        at(NOW_MS, event_type).decode(value)
    assert err.value.reason == "future"
    assert "ahead of this reader's clock" in str(err.value) and "max_event_ahead_ms" in str(err.value)


def test_a_time_in_microseconds_or_nanoseconds_is_named_as_such():
    for scale in (1000, 1000_000):
        with pytest.raises(InvalidEvent, match="milliseconds since the epoch") as err:
            at(NOW_MS, Click).decode(b'{"user_id":"u","item_id":"i","ts":%d}' % (NOW_MS * scale))
        assert err.value.reason == "invalid"
    with pytest.raises(InvalidEvent) as err:  # the unit is not in question for other values
        at(NOW_MS, Click).decode(b'{"user_id":"u","item_id":"i","ts":-1}')
    assert "milliseconds" not in str(err.value)


def test_event_times_within_the_allowance_are_accepted():
    click = at(NOW_MS, Click).decode(b'{"user_id":"u","item_id":"i","ts":%d}' % (NOW_MS + 60_000))
    assert click.ts == NOW_MS + 60_000
    item = at(NOW_MS, Item).decode(b'{"item_id":"i","created_at":1,"updated_at":%d}' % NOW_MS)
    assert item.updated_at == NOW_MS
    # the default allows an hour, against the real clock
    Decoder(Click).decode(b'{"user_id":"u","item_id":"i","ts":%d}' % (time.time() * 1000 + 3_000_000))
