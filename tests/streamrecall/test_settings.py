"""Settings: precedence (flags > env > TOML > defaults), validation naming the setting, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrecall.ops.cli import main
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
    ({"world_size": 0}, "world_size"),
    ({"world_size": 2, "rank": 2}, "rank"),
    ({"rank": -1}, "rank"),
    ({"master_port": 0}, "master_port"),
    ({"master_addr": " "}, "master_addr"),
    ({"model_updates_retention_ms": 60_000}, "model_updates_retention_ms"),
    ({"model_updates_retention_ms": -2}, "model_updates_retention_ms"),
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

    import streamrecall.consumers.topics as topics_mod

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


# --- the settings file: unknown keys, wrong types --------------------------------------------
def from_toml(tmp_path: Path, text: str) -> Settings:
    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    return Settings.from_sources({}, cfg)


@pytest.mark.parametrize("text,message", [
    ('sasl-password = "hunter2"\n', "^sasl_password: unknown setting \\(did you mean 'sasl_plain_password'\\?\\)"),
    ('topic_prefx = "p."\n', "^topic_prefx: unknown setting \\(did you mean 'topic_prefix'\\?\\)"),
    ('[mdoel]\ndim = 4\n', "^mdoel: unknown setting \\(did you mean 'model'\\?\\)"),
    ('partitions = "many"\n', "^partitions: must be an integer, got str"),
    ('partitions = true\n', "^partitions: must be an integer, got bool"),
    ('topic_prefix = 5\n', "^topic_prefix: must be a string, got int"),
    ('ssl_check_hostname = "maybe"\n', "^ssl_check_hostname: must be true or false, got str"),
    ('state_dir = 5\n', "^state_dir: must be a path, got int"),
    ('sasl_plain_password = 12345\n', "^sasl_plain_password: must be a string, got int"),
    ('model = 5\n', "^model: must be a table"),
])
def test_the_settings_file_refuses_unknown_keys_and_wrong_types_by_name(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        from_toml(tmp_path, text)
    assert "hunter2" not in str(info.value) and "12345" not in str(info.value)  # values are not echoed


def test_the_settings_file_keeps_its_tables_and_reads_text_values(tmp_path: Path):
    s = from_toml(tmp_path, 'partitions = "6"\nssl_check_hostname = "false"\nsecurity_protocol = "SSL"\n'
                            '[model]\ndim = 8\n[trainer]\nbatch_size = 64\n')
    assert (s.partitions, s.ssl_check_hostname) == (6, False)
    assert s.extra == {"model": {"dim": 8}, "trainer": {"batch_size": 64}}


def test_an_unknown_table_given_in_code_is_refused():
    with pytest.raises(ConfigError, match="^modle: unknown table"):
        Settings(extra={"modle": {"dim": 4}})


def test_invalid_toml_names_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        from_toml(tmp_path, "partitions = [\n")


# --- Kafka security: pass-through and the combinations that cannot work --------------------------
def test_ssl_options_reach_kafka_python(tmp_path: Path):
    ca, crl = tmp_path / "ca.pem", tmp_path / "crl.pem"
    ca.write_text("ca"), crl.write_text("crl")
    s = Settings(bootstrap_servers="k:9093", security_protocol="SSL", ssl_cafile=ca, ssl_crlfile=crl,
                 ssl_ciphers="ECDHE+AESGCM", ssl_check_hostname=False)
    conf = s.kafka_config()
    assert conf["ssl_crlfile"] == str(crl) and conf["ssl_cafile"] == str(ca)
    assert conf["ssl_ciphers"] == "ECDHE+AESGCM" and conf["ssl_check_hostname"] is False


def write_provider_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    (tmp_path / f"{name}.py").write_text(
        "from kafka.net.sasl.oauth import AbstractTokenProvider\n"
        "class Tokens(AbstractTokenProvider):\n"
        "    def token(self):\n"
        "        return 'tok'\n"
        "tokens = Tokens()\n"
        "not_a_provider = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("attribute", ["tokens", "Tokens"])
def test_oauthbearer_loads_the_token_provider_kafka_python_requires(tmp_path: Path, monkeypatch, attribute: str):
    from kafka.net.sasl.oauth import AbstractTokenProvider, SaslMechanismOAuth

    module = f"sr_tokens_{attribute.lower()}"
    write_provider_module(tmp_path, monkeypatch, module)
    s = Settings(bootstrap_servers="k:9093", security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                 sasl_oauth_token_provider=f"{module}:{attribute}")
    conf = s.kafka_config()
    provider = conf["sasl_oauth_token_provider"]
    assert isinstance(provider, AbstractTokenProvider) and provider.token() == "tok"
    assert s.kafka_config()["sasl_oauth_token_provider"] is provider  # one provider, one token cache
    SaslMechanismOAuth(**conf)  # kafka-python's own check of what it was given


@pytest.mark.parametrize("spec,message", [
    ("sr_tokens_bad:not_a_provider", "is str, not a kafka.net.sasl.oauth.AbstractTokenProvider"),
    ("sr_tokens_bad:missing", "is NoneType, not a"),
    ("no_such_module_15:tokens", "cannot import 'no_such_module_15'"),
    ("no-colon", "is not module:attribute"),
])
def test_a_token_provider_that_cannot_work_is_refused(tmp_path: Path, monkeypatch, spec: str, message: str):
    write_provider_module(tmp_path, monkeypatch, "sr_tokens_bad")
    with pytest.raises(ConfigError, match=f"^sasl_oauth_token_provider: .*{message}"):
        Settings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=spec)


def test_gssapi_passes_the_service_name_when_the_gssapi_package_is_there(monkeypatch):
    import streamrecall.kafka_security as ks

    monkeypatch.setattr(ks.importlib.util, "find_spec", lambda name: object() if name == "gssapi" else None)
    s = Settings(bootstrap_servers="k:9093", security_protocol="SASL_PLAINTEXT", sasl_mechanism="GSSAPI",
                 sasl_kerberos_service_name="kafka-prod")
    assert s.kafka_config()["sasl_kerberos_service_name"] == "kafka-prod"
    assert "sasl_kerberos_service_name" not in Settings(
        bootstrap_servers="k:9093", security_protocol="SASL_PLAINTEXT", sasl_mechanism="GSSAPI").kafka_config()


def test_gssapi_without_its_package_says_what_to_install(monkeypatch):
    import streamrecall.kafka_security as ks

    monkeypatch.setattr(ks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="^sasl_mechanism: GSSAPI needs the Python package gssapi"):
        Settings(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI")


@pytest.mark.parametrize("changes,message", [
    ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
      "sasl_plain_password": "p"}, "^sasl_mechanism: PLAIN needs security_protocol SASL_PLAINTEXT or SASL_SSL"),
    ({"sasl_mechanism": "SCRAM-SHA-512"}, "^sasl_mechanism: SCRAM-SHA-512 needs security_protocol"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u"},
     "^sasl_plain_password: required for sasl_mechanism PLAIN"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_password": "p"},
     "^sasl_plain_username: required for sasl_mechanism SCRAM-SHA-256"),
    ({"sasl_plain_username": "u"}, "^sasl_plain_username: only used by sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
     "^sasl_oauth_token_provider: required for sasl_mechanism OAUTHBEARER"),
    ({"sasl_oauth_token_provider": "m:a"}, "^sasl_oauth_token_provider: only used by sasl_mechanism OAUTHBEARER"),
    ({"sasl_kerberos_service_name": "kafka"}, "^sasl_kerberos_service_name: only used by sasl_mechanism GSSAPI"),
    ({"ssl_ciphers": "HIGH"}, "^ssl_ciphers: only used with security_protocol SSL or SASL_SSL"),
    ({"ssl_check_hostname": False}, "^ssl_check_hostname: only used with security_protocol SSL"),
    ({"security_protocol": "SSL", "ssl_cafile": Path("/nonexistent/ca.pem")}, "^ssl_cafile: /nonexistent/ca.pem is not"),
    ({"security_protocol": "SSL", "ssl_password": "p"}, "^ssl_password: it unlocks the client key"),
])
def test_security_combinations_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        Settings(**changes)


def test_no_log_line_or_repr_shows_a_secret(caplog: pytest.LogCaptureFixture, tmp_path: Path):
    cert = tmp_path / "c.pem"
    cert.write_text("c")
    s = Settings(bootstrap_servers="k:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                 sasl_plain_username="svc", sasl_plain_password="hunter2", ssl_certfile=cert, ssl_password="s3cret")
    assert isinstance(s.sasl_plain_password, Secret)  # a plain str given in code becomes a Secret
    with caplog.at_level("INFO"):
        s.log_effective("trainer")
    for text in (caplog.text, repr(s), str(s), str(s.masked()), str(s.replace(partitions=2))):
        assert "hunter2" not in text and "s3cret" not in text
    assert s.kafka_config()["sasl_plain_password"] == "hunter2" and s.kafka_config()["ssl_password"] == "s3cret"


def test_every_setting_flag_shows_its_environment_variable():
    from streamrecall.ops.cli import SETTING_OPTIONS, env_name

    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=400)
    assert result.exit_code == 0
    for flag, name, _, _ in SETTING_OPTIONS:
        assert env_name(name) in result.output, name
        assert flag.split("/")[0] in result.output


def test_a_boolean_flag_reads_its_environment_variable(monkeypatch):
    import streamrecall.consumers.topics as topics_mod

    seen = {}
    monkeypatch.setattr(topics_mod, "create_topics", lambda settings: seen.setdefault("s", settings) and {})
    env = {"STREAMRECALL_BOOTSTRAP_SERVERS": "h:1", "STREAMRECALL_SECURITY_PROTOCOL": "SSL",
           "STREAMRECALL_SSL_CHECK_HOSTNAME": "false", "STREAMRECALL_SSL_CIPHERS": "HIGH"}
    result = CliRunner().invoke(main, ["topics", "create"], env=env)
    assert result.exit_code == 0, result.output
    assert seen["s"].ssl_check_hostname is False and seen["s"].ssl_ciphers == "HIGH"


def test_rank_settings_read_torchruns_environment_unless_streamrecalls_is_set(monkeypatch):
    import streamrecall.consumers.topics as topics_mod

    seen = {}
    monkeypatch.setattr(topics_mod, "create_topics", lambda settings: seen.__setitem__("s", settings) or {})
    torchrun = {"STREAMRECALL_BOOTSTRAP_SERVERS": "h:1", "WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "trainer-0.trainer",
                "MASTER_PORT": "29511"}
    assert CliRunner().invoke(main, ["topics", "create"], env=torchrun).exit_code == 0
    s = seen["s"]
    assert (s.world_size, s.rank, s.master_addr, s.master_port) == (4, 3, "trainer-0.trainer", 29511)
    result = CliRunner().invoke(main, ["topics", "create"], env=torchrun | {"STREAMRECALL_RANK": "1"})
    assert result.exit_code == 0, result.output
    assert seen["s"].rank == 1  # ours first, then torchrun's
    assert Settings().world_size == 1 and Settings().rank == 0  # no job: one trainer
