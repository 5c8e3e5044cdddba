"""One frozen, validated settings object for the whole app.

Sources, highest precedence first: CLI flags, ``STREAMRECALL_*`` environment
variables (click reads both; see ``streamrecall.cli``), an optional TOML file
(``--config`` / ``STREAMRECALL_CONFIG``), then the defaults below. Secrets are
:class:`Secret` and never print.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from streamrecall.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

Role = Literal["trainer", "indexer", "publisher"]
ROLES: tuple[str, ...] = get_args(Role)
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]
#: Each role's default HTTP port (the indexer's API, the others' /metrics).
DEFAULT_PORTS: dict[str, int] = {"indexer": 8470, "trainer": 8471, "publisher": 8472}
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]*$")


class Secret(str):
    """A string that prints as ``***`` (passwords, keys)."""

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:  # the raw value is reached with .reveal()
        return "***"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True)
class Topics:
    """Physical topic names, all sharing one optional prefix."""

    items: str
    clicks: str
    user_vectors: str
    model_updates: str
    deadletter: str

    @classmethod
    def with_prefix(cls, prefix: str) -> "Topics":
        return cls(*(f"{prefix}{name}" for name in ("items", "clicks", "user-vectors", "model-updates", "deadletter")))

    def all(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Settings:
    """Effective settings. Construct with :meth:`from_sources` or directly (validated either way)."""

    bootstrap_servers: str | None = None  # None: start the embedded broker (`up` only)
    topic_prefix: str = ""
    partitions: int = 4
    replication_factor: int = 1  # for `topics create`; use 3 on a real cluster
    group_prefix: str = "streamrecall"
    state_dir: Path = Path("state")
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # None: the role's entry in DEFAULT_PORTS
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_value_bytes: int = 1 << 20
    # Batching of the poll loop: a flush + commit happens at least this often.
    max_poll_records: int = 2000
    flush_interval_ms: int = 200
    # Intra-op threads of torch in each role process. 1 by default: several roles, a broker and
    # HTTP threads share a machine, and oversubscribed torch threads spin (measured: a 50-click
    # training step took 26 ms with 1 thread, 790 ms with 2, on two busy cores; docs/operations.md).
    torch_threads: int = 1
    # Kafka security, passed through to kafka-python unchanged.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: Secret | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # role-specific keys from the TOML file
    config_file: Path | None = None  # the TOML file these settings were read from (children re-read it)

    def __post_init__(self) -> None:
        _check_literal("security_protocol", self.security_protocol, SecurityProtocol)
        _check_literal("log_level", self.log_level, Literal["DEBUG", "INFO", "WARNING", "ERROR"])
        if self.sasl_mechanism is not None:
            _check_literal("sasl_mechanism", self.sasl_mechanism, SaslMechanism)
        if self.bootstrap_servers is not None:
            for server in self.bootstrap_servers.split(","):
                host, _, port = server.strip().rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ConfigError(f"bootstrap_servers: {server!r} is not host:port "
                                      "(give a comma-separated list such as kafka-1:9092,kafka-2:9092)")
        if not _TOPIC_RE.match(self.topic_prefix):
            raise ConfigError(f"topic_prefix: {self.topic_prefix!r} may hold only letters, digits, '.', '_' and '-'")
        if not _TOPIC_RE.match(self.group_prefix) or not self.group_prefix:
            raise ConfigError(f"group_prefix: {self.group_prefix!r} must be non-empty letters, digits, '.', '_', '-'")
        _check_range("partitions", self.partitions, 1, 10_000)
        _check_range("replication_factor", self.replication_factor, 1, 32)
        _check_range("max_value_bytes", self.max_value_bytes, 1024, 64 << 20)
        _check_range("max_poll_records", self.max_poll_records, 1, 100_000)
        _check_range("flush_interval_ms", self.flush_interval_ms, 1, 60_000)
        _check_range("torch_threads", self.torch_threads, 1, 1024)
        if self.http_port is not None:
            _check_range("http_port", self.http_port, 0, 65535)
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ConfigError("sasl_mechanism: required when security_protocol is " + self.security_protocol)
        if self.security_protocol == "PLAINTEXT" and self.sasl_mechanism is not None:
            raise ConfigError("sasl_mechanism: set security_protocol to SASL_PLAINTEXT or SASL_SSL to use SASL")

    # --- derived values -------------------------------------------------
    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    def group_id(self, role: str) -> str:
        return f"{self.group_prefix}-{role}"

    def port_for(self, role: str) -> int:
        return self.http_port if self.http_port is not None else DEFAULT_PORTS[role]

    def role_state_dir(self, role: str) -> Path:
        return self.state_dir / role

    def kafka_config(self) -> dict[str, Any]:
        """Connection and security options for any kafka-python client."""
        if self.bootstrap_servers is None:
            raise ConfigError("bootstrap_servers: not set; pass --bootstrap-servers or use `streamrecall up`")
        conf: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(","),
                                "security_protocol": self.security_protocol}
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password.reveal() if self.sasl_plain_password else None,
            "ssl_cafile": str(self.ssl_cafile) if self.ssl_cafile else None,
            "ssl_certfile": str(self.ssl_certfile) if self.ssl_certfile else None,
            "ssl_keyfile": str(self.ssl_keyfile) if self.ssl_keyfile else None,
            "ssl_password": self.ssl_password.reveal() if self.ssl_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf

    def masked(self) -> dict[str, Any]:
        """The settings as a dict fit for logs: secrets masked."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if isinstance(value, Secret) else (str(value) if isinstance(value, Path) else value)
        return out

    def log_effective(self, role: str) -> None:
        log.info("%s starting with settings %s", role, self.masked())

    def to_env(self) -> dict[str, str]:
        """``STREAMRECALL_*`` variables that reproduce these settings in a child process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "extra":
                continue
            name = "CONFIG" if f.name == "config_file" else f.name.upper()
            env["STREAMRECALL_" + name] = value.reveal() if isinstance(value, Secret) else str(value)
        return env

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    # --- construction -----------------------------------------------------
    @classmethod
    def from_sources(cls, overrides: Mapping[str, Any], config_file: Path | None = None) -> "Settings":
        """Merge TOML file values under ``overrides`` (flags and environment, already parsed)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(load_toml(config_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in values.items() if k not in known}
        kwargs = {k: _coerce(k, v, known[k].type) for k, v in values.items()
                  if k in known and k not in ("extra", "config_file")}
        return cls(**kwargs, extra={**values.get("extra", {}), **extra}, config_file=config_file)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML settings file: top-level keys are setting names (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    ann = str(annotation)
    try:
        if "Secret" in ann:
            return Secret(value)
        if "Path" in ann:
            return Path(value)
        if ann.startswith("int"):
            return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {ann}") from None
    return value


def _check_literal(name: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}: {value!r} must be an integer from {lo} to {hi}")
