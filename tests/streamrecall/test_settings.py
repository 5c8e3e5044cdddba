"""Settings: precedence (flags > env > TOML > defaults), validation naming the setting, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrecall.cli import main
from streamrecall.errors import ConfigError
from streamrecall.settings import Secret, Settings


def test_defaults_are_valid_and_topics_share_the_prefix():
    s = Settings(topic_prefix="prod.")
    assert s.topics.items == "prod.items"
    assert s.topics.user_vectors == "prod.user-vectors"
    assert s.group_id("trainer") == "streamrecall-trainer"
    assert s.port_for("indexer") != s.port_for("trainer")


@pytest.mark.parametrize("changes,name", [
    ({"partitions": 0}, "partitions"),
    ({"bootstrap_servers": "no-port"}, "bootstrap_servers"),
    ({"topic_prefix": "bad prefix"}, "topic_prefix"),
    ({"security_protocol": "TLS"}, "security_protocol"),
    ({"security_protocol": "SASL_SSL"}, "sasl_mechanism"),
    ({"http_port": 70000}, "http_port"),
    ({"flush_interval_ms": 0}, "flush_interval_ms"),
])
def test_a_wrong_value_is_refused_with_the_settings_name(changes, name):
    with pytest.raises(ConfigError, match=f"^{name}:"):
        Settings(**changes)


def test_secrets_never_print_but_reach_kafka():
    s = Settings(bootstrap_servers="k:9092", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                 sasl_plain_username="svc", sasl_plain_password=Secret("hunter2"))
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.masked())
    conf = s.kafka_config()
    assert conf["sasl_plain_password"] == "hunter2"
    assert conf["security_protocol"] == "SASL_SSL" and conf["sasl_plain_username"] == "svc"


def test_precedence_flag_over_env_over_toml(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "s.toml"
    cfg.write_text('topic-prefix = "toml."\npartitions = 3\ngroup_prefix = "fromtoml"\n')
    seen = {}

    import streamrecall.topics as topics_mod

    def fake_create(settings):  # unit test: capture the settings instead of calling a broker
        seen["s"] = settings
        return {}

    monkeypatch.setattr(topics_mod, "create_topics", fake_create)
    env = {"STREAMRECALL_TOPIC_PREFIX": "env.", "STREAMRECALL_BOOTSTRAP_SERVERS": "h:1"}
    result = CliRunner().invoke(main, ["topics", "create", "--config", str(cfg), "--partitions", "5"], env=env)
    assert result.exit_code == 0, result.output
    s = seen["s"]
    assert s.partitions == 5  # flag beats TOML
    assert s.topic_prefix == "env."  # env beats TOML
    assert s.group_prefix == "fromtoml"  # TOML beats default
    assert s.bootstrap_servers == "h:1"


def test_cli_refuses_a_wrong_value_naming_the_setting():
    result = CliRunner().invoke(main, ["topics", "create", "--bootstrap-servers", "nohost"])
    assert result.exit_code == 2
    assert "bootstrap_servers" in result.output


def test_help_shows_environment_variables():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    assert "STREAMRECALL_BOOTSTRAP_SERVERS" in result.output
    assert "STREAMRECALL_STATE_DIR" in result.output


def test_torch_threads_default_to_one_and_are_checked():
    import pytest

    from streamrecall.errors import ConfigError
    from streamrecall.settings import Settings

    assert Settings().torch_threads == 1
    with pytest.raises(ConfigError, match="torch_threads"):
        Settings(torch_threads=0)
