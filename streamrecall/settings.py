"""One frozen, validated settings object for the whole app.

Sources, highest precedence first: CLI flags, ``STREAMRECALL_*`` environment
variables (click reads both; see ``streamrecall.ops.cli``), an optional TOML file
(``--config`` / ``STREAMRECALL_CONFIG``), then the defaults below. Secrets are
:class:`Secret` and never print.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from streamrecall.errors import ConfigError
from streamrecall.events import DEFAULT_MAX_AHEAD_MS
from streamrecall.kafka_security import check_security, security_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

Role = Literal["trainer", "indexer", "publisher"]
#: The roles of a system on one machine (``up`` runs them all).
ROLES: tuple[str, ...] = get_args(Role)
#: Roles of a scaled-out deployment, run beside those: the router in front of a sharded index.
SCALE_OUT_ROLES: tuple[str, ...] = ("router",)
#: Every role ``streamrecall run`` starts.
RUNNABLE_ROLES: tuple[str, ...] = (*ROLES, *SCALE_OUT_ROLES)
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]
#: Each role's default HTTP port (the indexer's API, the others' /metrics).
DEFAULT_PORTS: dict[str, int] = {"indexer": 8470, "trainer": 8471, "publisher": 8472, "router": 8473}
#: The indexer's admin port (/metrics, /items/ID?with_vector=1) is its HTTP port plus this, by default.
ADMIN_PORT_OFFSET = 1000
#: The tables a settings file may hold besides top-level settings (``[model]``, one per role).
TABLES: tuple[str, ...] = ("model", *RUNNABLE_ROLES)
#: Most shards an index may be split into (each takes at least one ``items`` partition).
MAX_SHARDS = 1024
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]*$")
#: No model-updates record is larger than this (Kafka's default message.max.bytes is about 1 MB).
MODEL_UPDATE_RECORD_BYTES = 1 << 20
#: Payload bytes per model-update chunk, at most and by default: 8 KiB of a record stay for its
#: headers (under 300 bytes) and Kafka's framing.
MODEL_UPDATE_CHUNK_BYTES = MODEL_UPDATE_RECORD_BYTES - (8 << 10)
#: Shortest model_signing_key accepted: an HMAC key guessable by brute force authenticates nothing.
MIN_SIGNING_KEY_CHARS = 16


class Secret(str):
    """A string that prints as ``***`` (passwords, keys)."""

    def __new__(cls, value: str = "") -> "Secret":
        # str(secret) is "***": wrapping a Secret again must keep the value, not that text
        return super().__new__(cls, value.reveal() if isinstance(value, Secret) else value)

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
    # `topics create` sets this retention.ms on model-updates: it must keep the newest full update
    # whole, so keep it well above the trainer's interval between full updates (full_every_s, 60 s;
    # at most 30 min for a big model, full_bytes_per_s). A full update at a million rows per id table
    # is ~200 MB, one every ~7 min: an hour of them is ~1.8 GB on the brokers' disks. -1: keep forever.
    model_updates_retention_ms: int = 3_600_000
    group_prefix: str = "streamrecall"
    state_dir: Path = Path("state")
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # None: the role's entry in DEFAULT_PORTS
    # The indexer's admin listener (/metrics, vectors). None: the HTTP port + ADMIN_PORT_OFFSET.
    admin_port: int | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_value_bytes: int = 1 << 20
    # Event times (click ts, item created_at/updated_at, user-vector times) further ahead of the
    # reading role's clock than this are dead-lettered as "future" (streamrecall/events.py).
    max_event_ahead_ms: int = DEFAULT_MAX_AHEAD_MS
    # Batching of the poll loop: a flush + commit happens at least this often.
    max_poll_records: int = 2000
    flush_interval_ms: int = 200
    # Intra-op threads of torch in each role process. 1 by default: several roles, a broker and
    # HTTP threads share a machine, and oversubscribed torch threads spin (measured: a 50-click
    # training step took 26 ms with 1 thread, 790 ms with 2, on two busy cores; docs/operations.md).
    torch_threads: int = 1
    # A data-parallel trainer job (docs/roles.md): this process is rank ``rank`` of ``world_size``,
    # and the ranks meet at master_addr:master_port (rank 0 listens there). 1: one trainer, no
    # torch.distributed at all. Under torchrun its WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT
    # are read when the STREAMRECALL_* variables are unset (streamrecall/ops/cli.py).
    world_size: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # Kafka security, passed through to kafka-python unchanged.
    # How long a client waits for its first broker connection before giving up with a clear error.
    bootstrap_timeout_ms: int = 5_000
    # Kafka security, passed through to kafka-python unchanged (streamrecall/kafka_security.py
    # refuses the combinations that cannot work).
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: Secret | None = None
    sasl_kerberos_service_name: str | None = None  # GSSAPI; None: kafka-python's default, "kafka"
    sasl_oauth_token_provider: str | None = None  # OAUTHBEARER: module:attribute of an AbstractTokenProvider
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: Secret | None = None
    ssl_crlfile: Path | None = None
    ssl_ciphers: str | None = None
    ssl_check_hostname: bool = True
    # Model-update trust (docs/security.md). Top-level, not in [model]: the [model] table holds the
    # structural fields every role shares and is logged as it is; a key must be a Secret.
    model_signing_key: Secret | None = None  # HMAC-SHA256 key: the trainer signs, replicas refuse the rest
    model_max_version_jump: int = 10_000_000  # replicas refuse an update this many versions above theirs
    # Model updates travel in chunks of at most this many payload bytes (consumers/update_chunks.py).
    model_update_chunk_bytes: int = MODEL_UPDATE_CHUNK_BYTES
    # Readers assemble at most this many bytes of one update. None: the largest update the [model]
    # table's model can produce (every row of every table and the dense layers; model/update.py).
    model_update_max_bytes: int | None = None
    # A sharded index (docs/api.md, "Sharded index"): the indexer with ``shard`` set holds the items
    # of the ``items`` partitions p with p % shards == shard; None: one indexer holds every item.
    shard: int | None = None
    shards: int = 1
    # The router: the shards' recall URLs in shard order, ';' between shards, ',' between replicas.
    shard_urls: str | None = None
    # Source records each role remembers having dead-lettered (so a re-read one is not sent again);
    # beyond it the oldest are forgotten and may be dead-lettered a second time (docs/operations.md).
    deadletter_dedup_max: int = 100_000
    extra: Mapping[str, Any] = field(default_factory=dict)  # the [model] and role tables of the TOML file
    config_file: Path | None = None  # the TOML file these settings were read from (children re-read it)

    def __post_init__(self) -> None:
        for name in ("sasl_plain_password", "ssl_password", "model_signing_key"):  # a plain str is still a secret
            value = getattr(self, name)
            if isinstance(value, str) and not isinstance(value, Secret):
                object.__setattr__(self, name, Secret(value))
        _check_types(self)
        for table, values in self.extra.items():
            if table not in TABLES:
                raise ConfigError(f"{table}: unknown table (known: {', '.join(TABLES)})")
            if not isinstance(values, Mapping):
                raise ConfigError(f"{table}: must be a table ([{table}]), got {type(values).__name__}")
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
        retention = self.model_updates_retention_ms
        if retention != -1 and (not isinstance(retention, int) or isinstance(retention, bool)
                                or not 600_000 <= retention <= 365 * 86_400_000):
            raise ConfigError(f"model_updates_retention_ms: {retention!r} must be -1 (keep forever) or from 600000 "
                              "(10 min) to a year in ms, well above the trainer's full_every_s")
        _check_range("max_value_bytes", self.max_value_bytes, 1024, 64 << 20)
        _check_range("max_event_ahead_ms", self.max_event_ahead_ms, 1_000, 10 * 365 * 86_400_000)
        _check_range("max_poll_records", self.max_poll_records, 1, 100_000)
        _check_range("flush_interval_ms", self.flush_interval_ms, 1, 60_000)
        _check_range("torch_threads", self.torch_threads, 1, 1024)
        _check_range("world_size", self.world_size, 1, 4096)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank: {self.rank!r} must be an integer from 0 to world_size - 1 "
                              f"({self.world_size - 1}); give each process of the job its own rank")
        if not self.master_addr.strip():
            raise ConfigError("master_addr: must name the host of rank 0 (e.g. trainer-0.trainer)")
        _check_range("master_port", self.master_port, 1, 65535)
        _check_range("bootstrap_timeout_ms", self.bootstrap_timeout_ms, 100, 300_000)
        _check_range("model_max_version_jump", self.model_max_version_jump, 1, 2**62)
        _check_range("deadletter_dedup_max", self.deadletter_dedup_max, 1, 2**31)
        _check_range("model_update_chunk_bytes", self.model_update_chunk_bytes, 1024, MODEL_UPDATE_CHUNK_BYTES)
        if self.model_update_max_bytes is not None:
            _check_range("model_update_max_bytes", self.model_update_max_bytes, 1 << 20, 1 << 40)
        if self.model_signing_key is not None and len(self.model_signing_key.reveal()) < MIN_SIGNING_KEY_CHARS:
            # the length is safe to say; the key is not
            raise ConfigError(f"model_signing_key: must be at least {MIN_SIGNING_KEY_CHARS} characters, got "
                              f"{len(self.model_signing_key.reveal())} (e.g. `openssl rand -hex 32`)")
        _check_range("shards", self.shards, 1, MAX_SHARDS)
        if self.shard is not None:
            _check_range("shard", self.shard, 0, self.shards - 1)
        elif self.shards > 1:
            raise ConfigError(f"shards: an index of {self.shards} shards needs --shard I (0 to {self.shards - 1}) "
                              "on each indexer")
        if self.http_port is not None:
            _check_range("http_port", self.http_port, 0, 65535)
        if self.admin_port is not None:
            _check_range("admin_port", self.admin_port, 0, 65535)
            if self.admin_port == self.http_port and self.admin_port != 0:
                raise ConfigError(f"admin_port: {self.admin_port} is the HTTP port too; give the admin "
                                  "listener (/metrics, vectors) a port of its own")
        check_security(self)

    # --- derived values -------------------------------------------------
    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    def group_id(self, role: str) -> str:
        return f"{self.group_prefix}-{role}"

    def port_for(self, role: str) -> int:
        return self.http_port if self.http_port is not None else DEFAULT_PORTS[role]

    def admin_port_for(self, role: str) -> int:
        """The indexer's admin listener: ``admin_port``, else the role's HTTP port + ADMIN_PORT_OFFSET."""
        return self.admin_port if self.admin_port is not None else self.port_for(role) + ADMIN_PORT_OFFSET

    def role_state_dir(self, role: str) -> Path:
        """Where ``role`` keeps its state; shard I of an index of N keeps its own, ``indexer-shard-I-of-N``
        (another split of the index starts from an empty one: its snapshot would hold other items)."""
        if role == "indexer" and self.shard is not None:
            return self.state_dir / f"indexer-shard-{self.shard}-of-{self.shards}"
        return self.state_dir / role

    def kafka_config(self) -> dict[str, Any]:
        """Connection and security options for any kafka-python client."""
        if self.bootstrap_servers is None:
            raise ConfigError("bootstrap_servers: not set; pass --bootstrap-servers or use `streamrecall up`")
        return {"bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",")],
                "bootstrap_timeout_ms": self.bootstrap_timeout_ms, **security_config(self)}

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
        settable = {f.name for f in dataclasses.fields(cls)} - {"extra", "config_file"}
        extra = {k: v for k, v in values.items() if k in TABLES}
        for key in values:
            if key not in settable and key not in TABLES:  # a typo must not pass silently (or print a secret)
                close = [_FLAG_NAMES[key]] if key in _FLAG_NAMES else \
                    difflib.get_close_matches(key, sorted(settable | set(TABLES)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{key}: unknown setting{hint}; the settings are listed by `streamrecall run --help`")
        kwargs = {k: _coerce(k, v) for k, v in values.items() if k in settable}
        return cls(**kwargs, extra=extra, config_file=config_file)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML settings file: top-level keys are setting names (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}; fix the file") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
#: Flags whose setting has another name (--sasl-username sets sasl_plain_username, as in kafka-python).
_FLAG_NAMES = {"sasl_username": "sasl_plain_username", "sasl_password": "sasl_plain_password"}


def _kind(name: str) -> type:
    """The plain type of a setting: ``int | None`` and ``Literal[...]`` give int and str."""
    hint = _HINTS[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal or (args and typing.get_origin(args[0]) is Literal):
        return str
    return args[0] if args and typing.get_origin(hint) is not None else hint


def _coerce(name: str, value: Any) -> Any:
    """Text (environment, TOML strings) to the setting's type; other values go to the type check as they are."""
    kind = _kind(name)
    if not isinstance(value, str):
        return Path(value) if kind is Path and isinstance(value, Path) else value
    if kind is Secret:
        return Secret(value)
    if kind is Path:
        return Path(value)
    if kind is bool and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if kind is int and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
        return int(value)
    return value


def _check_types(settings: "Settings") -> None:
    """Each setting holds its type (None where optional): a wrong type is refused by name, and
    the value is not echoed, since it may be a secret under a wrong name."""
    for name in _HINTS:
        value = getattr(settings, name)
        if name in ("extra", "config_file") or (value is None and type(None) in get_args(_HINTS[name])):
            continue
        kind = _kind(name)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{name}: must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    if not isinstance(settings.extra, Mapping):
        raise ConfigError(f"extra: must be a mapping of tables, got {type(settings.extra).__name__}")


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", Path: "a path", Secret: "a string"}


def _check_literal(name: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}: {value!r} must be an integer from {lo} to {hi}")


_HINTS: dict[str, Any] = typing.get_type_hints(Settings)
