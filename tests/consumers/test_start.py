"""Parsing of start positions (`--from`)."""

import pytest

from streamrecall.consumers.start import parse_start
from streamrecall.errors import ConfigError


def test_simple_kinds():
    for kind in ("committed", "earliest", "latest"):
        assert parse_start(kind).kind == kind


def test_timestamp_iso_and_epoch():
    assert parse_start("timestamp:2026-11-28T00:00:00Z").timestamp_ms == 1795824000000
    assert parse_start("timestamp:2026-11-28T00:00:00").timestamp_ms == 1795824000000
    assert parse_start("timestamp:1795824000000").timestamp_ms == 1795824000000


def test_explicit_offsets_with_dotted_topic_names():
    start = parse_start("offsets:prod.clicks:0=5,prod.clicks:1=7")
    assert start.offsets == {("prod.clicks", 0): 5, ("prod.clicks", 1): 7}


@pytest.mark.parametrize("bad", ["nowhere", "timestamp:yesterday", "offsets:clicks=5", "offsets:clicks:0=-1", "earliest:3"])
def test_bad_positions_are_refused(bad):
    with pytest.raises(ConfigError, match="^from:"):
        parse_start(bad)


def test_a_timestamp_with_a_non_ascii_digit_is_a_config_error_not_a_crash():
    import pytest

    from streamrecall.consumers.start import parse_start
    from streamrecall.errors import ConfigError

    with pytest.raises(ConfigError, match="timestamp"):
        parse_start("timestamp:²")
