"""The sharded index's settings: --shard/--shards/--shard-urls and the [router] table, refused clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamrecall.consumers.roles.router.options import RouterOptions
from streamrecall.consumers.roles.router.wiring import RouterRole
from streamrecall.errors import ConfigError
from streamrecall.settings import Settings


def test_a_shard_keeps_its_own_state_and_an_unsharded_indexer_keeps_the_old_place():
    assert Settings(state_dir=Path("s")).role_state_dir("indexer") == Path("s/indexer")
    sharded = Settings(state_dir=Path("s"), shard=1, shards=3)
    assert sharded.role_state_dir("indexer") == Path("s/indexer-shard-1-of-3")
    assert sharded.role_state_dir("trainer") == Path("s/trainer")
    assert Settings(state_dir=Path("s"), shard=0).role_state_dir("indexer") == Path("s/indexer-shard-0-of-1")


@pytest.mark.parametrize("changes, message", [
    ({"shards": 2}, "needs --shard I (0 to 1)"),
    ({"shard": 2, "shards": 2}, "shard: 2 must be an integer from 0 to 1"),
    ({"shard": -1}, "shard: -1 must be an integer from 0 to 0"),
    ({"shards": 0}, "shards: 0 must be an integer from 1 to 1024"),
])
def test_shard_settings_out_of_range_are_refused_by_name(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(**changes)


def test_shard_settings_come_from_the_environment_as_text():
    settings = Settings.from_sources({"shard": "1", "shards": "4", "shard_urls": "http://a:1;http://b:2"})
    assert (settings.shard, settings.shards, settings.shard_urls) == (1, 4, "http://a:1;http://b:2")


def test_the_router_table_takes_its_choice_as_text_and_refuses_others():
    options = RouterOptions.from_settings(Settings(extra={"router": {"partial": "refuse", "deadline_ms": 80}}))
    assert options.partial == "refuse" and options.deadline_ms == 80.0
    with pytest.raises(ConfigError, match="router.partial: 'drop' is not one of answer, refuse"):
        RouterOptions.from_settings(Settings(extra={"router": {"partial": "drop"}}))
    with pytest.raises(ConfigError, match="router.partial: must be text"):
        RouterOptions.from_settings(Settings(extra={"router": {"partial": 1}}))
    with pytest.raises(ConfigError, match="router.deadline_ms: must be > 0"):
        RouterOptions.from_settings(Settings(extra={"router": {"deadline_ms": 0}}))
    with pytest.raises(ConfigError, match="router.deadline: unknown setting"):
        RouterOptions.from_settings(Settings(extra={"router": {"deadline": 5}}))


def test_a_router_without_shard_urls_is_refused_before_it_connects():
    with pytest.raises(ConfigError, match="shard_urls: the router needs the shards' addresses"):
        RouterRole(Settings(bootstrap_servers="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="shard_urls: shard 1 has no URL"):
        RouterRole(Settings(bootstrap_servers="127.0.0.1:1", shard_urls="http://a:1;"))
