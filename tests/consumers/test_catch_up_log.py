"""The runtime's catch-up progress lines: a replay or a restart after downtime says how far it is."""

from __future__ import annotations

import logging

import pytest

from streamrecall.consumers.catchup import CatchUpLog


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "streamrecall.consumers.catchup"]


def test_a_backlog_is_reported_as_it_closes_and_when_it_is_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "streamrecall.consumers.catchup")
    log = CatchUpLog("trainer", backlog=1_000, every_s=10)
    log.observe(50_000, 0.0)
    for t in range(1, 10):  # within every_s: nothing more
        log.observe(50_000 - 2_000 * t, float(t))
    log.observe(30_000, 10.0)
    log.observe(0, 15.0)
    got = lines(caplog)
    assert got[0] == "trainer: 50000 records behind; catching up"
    assert got[1] == ("trainer: catching up: 30000 records behind (40% done), lag closing at 2000 records/s, "
                      "about 15 s to go")
    assert got[2] == "trainer: caught up: a backlog of 50000 records in 15 s"
    assert len(got) == 3


def test_small_lag_is_normal_operation_and_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "streamrecall.consumers.catchup")
    log = CatchUpLog("publisher", backlog=10_000)
    for t in range(100):
        log.observe(t % 5_000, float(t))
    assert lines(caplog) == []


def test_a_lag_that_does_not_close_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "streamrecall.consumers.catchup")
    log = CatchUpLog("indexer", backlog=100, every_s=1)
    log.observe(500, 0.0)
    log.observe(600, 1.0)
    assert lines(caplog)[-1].endswith("not closing: records arrive as fast as read")
