"""The `streamrecall` command line. Every flag falls back to a ``STREAMRECALL_*`` variable (shown in --help)."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, get_args

import click
from click.core import ParameterSource
from kafka.errors import KafkaError

from streamrecall.errors import StreamrecallError
from streamrecall.settings import ROLES, RUNNABLE_ROLES, SaslMechanism, SecurityProtocol, Settings

log = logging.getLogger("streamrecall")

ENV = "STREAMRECALL_"

#: Variables torchrun sets, read for these settings when the STREAMRECALL_* ones are unset.
TORCHRUN_ENV = {"world_size": "WORLD_SIZE", "rank": "RANK", "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}

#: (flag, setting name, click type, help). One list: flags, env names and settings stay in step.
SETTING_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--bootstrap-servers", "bootstrap_servers", str, "Kafka bootstrap servers, host:port[,host:port]."),
    ("--topic-prefix", "topic_prefix", str, "Prefix for every topic name."),
    ("--partitions", "partitions", int, "Partitions per topic when creating topics."),
    ("--replication-factor", "replication_factor", int, "Replicas per topic when creating topics."),
    ("--model-updates-retention-ms", "model_updates_retention_ms", int,
     "retention.ms of model-updates when creating topics (well above full_every_s; -1: forever)."),
    ("--group-prefix", "group_prefix", str, "Consumer group ids are PREFIX-ROLE."),
    ("--state-dir", "state_dir", click.Path(path_type=Path), "Where roles keep snapshots and checkpoints."),
    ("--http-host", "http_host", str, "Bind address for HTTP (loopback unless told otherwise)."),
    ("--http-port", "http_port", int, "HTTP port (the indexer's public API; /metrics elsewhere)."),
    ("--admin-port", "admin_port", int,
     "The indexer's admin port: /metrics and item vectors (default: the HTTP port + 1000)."),
    ("--log-level", "log_level", click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), "Log level."),
    ("--max-value-bytes", "max_value_bytes", int, "Larger values are dead-lettered as oversized."),
    ("--max-event-ahead-ms", "max_event_ahead_ms", int,
     "Event times further ahead of the clock are dead-lettered as future (default 1 h)."),
    ("--flush-interval-ms", "flush_interval_ms", int, "Flush side effects and commit at least this often."),
    ("--torch-threads", "torch_threads", int, "Intra-op torch threads per role process (raise on dedicated cores)."),
    ("--world-size", "world_size", int, "Trainer processes of one data-parallel job (default 1: no torch.distributed)."),
    ("--rank", "rank", int, "This trainer's rank in the job, 0 to world size - 1 (rank 0 publishes)."),
    ("--master-addr", "master_addr", str, "Host of the job's rank 0, where the ranks meet (default 127.0.0.1)."),
    ("--master-port", "master_port", int, "Port rank 0 listens on for the job's ranks (default 29500)."),
    ("--bootstrap-timeout-ms", "bootstrap_timeout_ms", int,
     "Give up with an error when no broker answers within this time (default 5000)."),
    ("--security-protocol", "security_protocol", click.Choice(list(get_args(SecurityProtocol))),
     "Kafka security protocol."),
    ("--sasl-mechanism", "sasl_mechanism", click.Choice(list(get_args(SaslMechanism))),
     "SASL mechanism (needs a SASL_* security protocol)."),
    ("--sasl-username", "sasl_plain_username", str, "SASL username (PLAIN, SCRAM)."),
    ("--sasl-password", "sasl_plain_password", str, "SASL password (PLAIN, SCRAM; never logged)."),
    ("--sasl-kerberos-service-name", "sasl_kerberos_service_name", str,
     "GSSAPI: the brokers' Kerberos service name (kafka-python's default: kafka)."),
    ("--sasl-oauth-token-provider", "sasl_oauth_token_provider", str,
     "OAUTHBEARER: module:attribute of a kafka-python AbstractTokenProvider (instance or class)."),
    ("--ssl-cafile", "ssl_cafile", click.Path(path_type=Path), "CA bundle for SSL."),
    ("--ssl-certfile", "ssl_certfile", click.Path(path_type=Path), "Client certificate for SSL."),
    ("--ssl-keyfile", "ssl_keyfile", click.Path(path_type=Path), "Client key for SSL."),
    ("--ssl-password", "ssl_password", str, "Password of the SSL key (never logged)."),
    ("--ssl-crlfile", "ssl_crlfile", click.Path(path_type=Path), "Certificate revocation list for SSL."),
    ("--ssl-ciphers", "ssl_ciphers", str, "OpenSSL cipher list for SSL connections."),
    ("--ssl-check-hostname/--no-ssl-check-hostname", "ssl_check_hostname", bool,
     "Check that the broker's certificate names its host (default: check)."),
    ("--model-signing-key", "model_signing_key", str,
     "HMAC-SHA256 key for model updates: the trainer signs, replicas refuse unsigned or badly signed ones "
     "(never logged; prefer the environment variable, flags show in ps)."),
    ("--model-max-version-jump", "model_max_version_jump", int,
     "Replicas refuse a model update more than this many versions above theirs (default 10000000)."),
    ("--model-update-chunk-bytes", "model_update_chunk_bytes", int,
     "Model updates travel in chunks of at most this many bytes, one record each "
     "(default and maximum 1040384: no record above 1 MiB)."),
    ("--model-update-max-bytes", "model_update_max_bytes", int,
     "Readers assemble at most this many bytes of one model update; larger ones are dead-lettered "
     "(default: the largest update the [model] can produce)."),
    ("--shard", "shard", int,
     "indexer: hold shard I of a sharded index, the items partitions p with p % --shards == I (default: every item)."),
    ("--shards", "shards", int, "indexer: how many shards the index is split into (default 1)."),
    ("--shard-urls", "shard_urls", str,
     "router: the shards' URLs in shard order, ';' between shards, ',' between replicas of one "
     "(e.g. 'http://idx-0:8470;http://idx-1:8470')."),
    ("--deadletter-dedup-max", "deadletter_dedup_max", int,
     "Dead-lettered source records each role remembers, so a re-read one is not sent again; the oldest "
     "beyond it are forgotten (default 100000)."),
]


def env_name(setting: str) -> str:
    return ENV + setting.upper()


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add every setting as a flag with its environment variable, plus --config."""
    for flag, name, type_, help_ in reversed(SETTING_OPTIONS):
        envvar = [env_name(name), TORCHRUN_ENV[name]] if name in TORCHRUN_ENV else env_name(name)
        fn = click.option(flag, name, type=type_, default=None, envvar=envvar, show_envvar=True,
                          help=help_)(fn)
    fn = click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                      envvar=ENV + "CONFIG", show_envvar=True, help="TOML settings file (flags and env win).")(fn)
    return fn


def build_settings(ctx: click.Context, params: dict[str, Any]) -> Settings:
    """Flags and env (click) over the TOML file over defaults; refuse wrong values with the setting's name."""
    overrides = {}
    for _, name, _, _ in SETTING_OPTIONS:
        value = params.pop(name, None)
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            overrides[name] = value
    settings = Settings.from_sources(overrides, params.pop("config_file", None))
    logging.getLogger().setLevel(settings.log_level)
    return settings


def with_settings(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the command receives ``settings`` built from the setting flags."""

    @settings_options
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, **params: Any) -> Any:
        settings = build_settings(ctx, params)
        return fn(settings=settings, **params)

    return wrapper


def _show_envvars(command: click.Command | None) -> click.Command | None:
    """Show each option's environment variable in --help: the named ones (settings) and the ones
    click derives from ``auto_envvar_prefix`` (STREAMRECALL_<COMMAND>_<PARAMETER>)."""
    for param in getattr(command, "params", ()):
        if isinstance(param, click.Option):
            param.show_envvar = True
    return command


class _Group(click.Group):
    """Turns streamrecall's own errors into one clear line and exit status 2."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _show_envvars(super().get_command(ctx, name))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StreamrecallError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KafkaError as exc:  # the backstop at the edge: one line, not kafka-python's traceback
            click.echo(f"error: Kafka: {type(exc).__name__}: {exc}; check the broker and the security "
                       "settings", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                           # command options read STREAMRECALL_<COMMAND>_<OPTION> too
                                           "auto_envvar_prefix": "STREAMRECALL"})
@click.version_option(package_name="streamrecall", prog_name="streamrecall", message="%(prog)s %(version)s")
def main() -> None:
    """streamrecall: a streaming real-time recall updater (Kafka in, fresh item index and user vectors out)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)


def require_bootstrap(settings: Settings) -> Settings:
    """The settings with a broker: the configured one, else the one a running `up` recorded in
    the same state dir (its embedded broker's port is picked at start)."""
    if settings.bootstrap_servers is None:
        from streamrecall.ops.up import running_address

        running = running_address(settings.state_dir)
        if running is not None:
            click.echo(f"using the broker of the running `streamrecall up` (pid {running['pid']}): "
                       f"{running['bootstrap_servers']}", err=True)
            return settings.replace(bootstrap_servers=running["bootstrap_servers"])
        raise click.UsageError(f"no broker: pass --bootstrap-servers or set {env_name('bootstrap_servers')} "
                               f"(or run `streamrecall up`, which starts an embedded one and records it in "
                               f"{settings.state_dir}/up.json)")
    return settings


# --- broker and topics -----------------------------------------------------------
@main.command()
@click.option("--host", default="127.0.0.1", envvar=ENV + "BROKER_HOST", show_envvar=True, help="Listen address.")
@click.option("--port", default=9092, envvar=ENV + "BROKER_PORT", show_envvar=True, help="Port; 0 picks a free one.")
def broker(host: str, port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory only) until interrupted."""
    import signal
    import threading

    from streamrecall.devtools.broker import EmbeddedBroker

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(host, port) as b:
        click.echo(f"broker listening on {b.bootstrap_servers} (memory only: stopping it empties every topic)")
        while not stop.wait(0.5):
            if b.process is not None and b.process.poll() is not None:
                raise StreamrecallError(f"broker exited with status {b.process.returncode}")


@main.group()
def topics() -> None:
    """Manage topics."""


@topics.command("create")
@with_settings
def topics_create(settings: Settings) -> None:
    """Create the topics (user-vectors compacted, model-updates single-partition)."""
    from streamrecall.consumers.topics import create_topics

    for name, state in sorted(create_topics(require_bootstrap(settings)).items()):
        click.echo(f"{name}: {state}")


# --- data in ------------------------------------------------------------------------
@main.command()
@click.argument("topic", type=click.Choice(["items", "clicks", "user-vectors", "model-updates", "deadletter"]))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rate", type=float, default=None, help="Records per second (default: as fast as possible).")
@with_settings
def produce(settings: Settings, topic: str, file: Path, rate: float | None) -> None:
    """Load a JSONL file of events into TOPIC (keyed by item_id or user_id)."""
    from streamrecall.consumers.clients import make_producer
    from streamrecall.ops.produce import KEY_FIELD, produce_values, read_jsonl

    from streamrecall.ops.progress import track

    require_bootstrap(settings)
    physical = settings.topics.all()[topic.replace("-", "_")]
    producer = make_producer(settings)
    n = produce_values(producer, physical, track(read_jsonl(file), desc=physical), KEY_FIELD.get(topic),
                       rate_per_s=rate)
    producer.close()
    click.echo(f"produced {n:,} records to {physical}", err=True)


@main.command()
@click.option("--items", "n_items", default=2_000, show_default=True, help="Catalog size at the start.")
@click.option("--users", "n_users", default=1_000, show_default=True, help="Number of users.")
@click.option("--clicks", "n_clicks", default=50_000, show_default=True, help="Number of clicks.")
@click.option("--seed", default=7, show_default=True, help="Random seed (the stream is deterministic).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write items.jsonl and clicks.jsonl here.")
@click.option("--produce/--no-produce", "to_kafka", default=False, help="Produce to the topics instead.")
@click.option("--rate", type=float, default=None, help="With --produce: clicks per second of wall time.")
@with_settings
def generate(settings: Settings, n_items: int, n_users: int, n_clicks: int, seed: int, out: Path | None,
             to_kafka: bool, rate: float | None) -> None:
    """Generate a seeded synthetic stream of items and clicks (files, or straight to Kafka)."""
    from streamrecall.devtools.livestream import produce_stream, write_jsonl
    from streamrecall.ops.progress import track
    from streamrecall.devtools.synthetic import SyntheticConfig, generate as gen

    config = SyntheticConfig(n_items=n_items, n_users=n_users, n_clicks=n_clicks, seed=seed)
    if out is None and not to_kafka:
        raise click.UsageError("say where the stream goes: --out DIR or --produce")
    if out is not None:
        counts = write_jsonl(track(gen(config), desc=f"writing {out}", unit="events"), out)
        click.echo(f"wrote {counts} to {out}")
    if to_kafka:
        counts = produce_stream(require_bootstrap(settings), track(gen(config), desc="producing", unit="events"),
                                rate_per_s=rate)
        click.echo(f"produced {counts}")


# --- roles ---------------------------------------------------------------------------
@main.command()
@click.argument("role", type=click.Choice(list(RUNNABLE_ROLES)))
@click.option("--from", "start", default="committed", envvar=ENV + "FROM", show_envvar=True,
              help="Start position: committed | earliest | latest | timestamp:ISO | offsets:TOPIC:P=O,...")
@with_settings
def run(settings: Settings, role: str, start: str) -> None:
    """Run one role as a long-running consumer process."""
    from streamrecall.consumers.roles import run_role
    from streamrecall.consumers.start import parse_start

    run_role(role, require_bootstrap(settings), parse_start(start))


@main.command()
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--rate", type=float, default=200.0, help="Synthetic clicks per second (0: no generator).")
@click.option("--roles", default=",".join(ROLES), help="Comma-separated roles to run.")
@click.option("--broker-port", default=0, help="Embedded broker port (0: a free one).")
@with_settings
def up(settings: Settings, duration: float | None, rate: float, roles: str, broker_port: int) -> None:
    """Everything on one machine: broker (embedded unless --bootstrap-servers), topics, roles, live stream."""
    from streamrecall.ops.up import run_up

    wanted = [r for r in roles.split(",") if r]
    unknown = set(wanted) - set(ROLES)
    if unknown:
        raise click.UsageError(f"--roles: unknown {sorted(unknown)}; choose from {', '.join(ROLES)}")
    run_up(settings, roles=wanted, rate=rate, duration=duration, broker_port=broker_port)


@main.command()
@click.option("--wait", is_flag=True, help="Block until every group's lag is zero.")
@click.option("--timeout", type=float, default=300.0, help="With --wait: give up after this many seconds.")
@with_settings
def status(settings: Settings, wait: bool, timeout: float) -> None:
    """Committed offset and lag per partition for every role's consumer group."""
    from streamrecall.ops.status import print_status

    from streamrecall.ops.up import running_address

    running = running_address(settings.state_dir) if settings.bootstrap_servers is None else None
    ok = print_status(require_bootstrap(settings), wait=wait, timeout_s=timeout,
                      ports=running["ports"] if running else None)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--items", "items_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL items stream (with --clicks); default: the synthetic stream.")
@click.option("--clicks", "clicks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL clicks stream (with --items).")
@click.option("-k", "k", default=50, show_default=True, help="Top K asked for each user.")
@click.option("--warmup", default=0.5, show_default=True, help="Share of the stream replayed before scoring.")
@click.option("--chunks", "n_chunks", default=10, show_default=True, help="Scored chunks after the warm-up.")
@click.option("--synthetic-items", default=2_000, show_default=True)
@click.option("--synthetic-users", default=1_000, show_default=True)
@click.option("--synthetic-clicks", default=40_000, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--id-buckets", default=1 << 16, show_default=True, help="Model id-table rows for this run.")
@click.option("--no-peers", is_flag=True, help="Skip the costly peer: a second live system without logQ (model offline and most-popular always run).")
@click.option("--option", "role_options", multiple=True, metavar="TABLE.KEY=VALUE",
              help="A settings-file value for the roles under test, e.g. trainer.dense_every_s=30 or "
                   "model.temperature=0.1 or model.tower=fm (repeatable; numbers, true/false and names).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State and logs of the run (default: a temporary directory).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write evaluate-hr-per-chunk.png (HR@K of every recommender per chunk) into this "
                   "directory (needs matplotlib: pip install 'streamrecall[devtools]').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(items_file: Path | None, clicks_file: Path | None, k: int, warmup: float, n_chunks: int,
             synthetic_items: int, synthetic_users: int, synthetic_clicks: int, seed: int, id_buckets: int,
             no_peers: bool, role_options: tuple[str, ...], work_dir: Path | None, plot_dir: Path | None,
             as_json: bool) -> None:
    """Prequential (test-then-train) HR@K / Recall@K of the live system against peers, same chunks."""
    import json
    import tempfile

    from streamrecall.devtools import evaluate as ev

    if (items_file is None) != (clicks_file is None):
        raise click.UsageError("give both --items and --clicks, or neither (the synthetic stream)")
    if not 0 <= warmup < 1 or n_chunks < 1 or not 1 <= k <= ev.MAX_FETCH:
        raise click.UsageError(f"need 0 <= --warmup < 1, --chunks >= 1 and 1 <= -k <= {ev.MAX_FETCH}")
    if items_file is not None and clicks_file is not None:
        events = ev.load_jsonl(items_file, clicks_file)
    else:
        events = list(ev.synthetic_events(synthetic_items, synthetic_users, synthetic_clicks, seed))
    tables = ev.parse_options(role_options)
    model = {"id_buckets": id_buckets, "estimator_buckets": id_buckets, **tables.pop("model", {})}
    with tempfile.TemporaryDirectory(prefix="streamrecall-eval-") as tmp:
        result = ev.evaluate(events, k=k, warmup_share=warmup, n_chunks=n_chunks, state_dir=work_dir or Path(tmp),
                             model=model, peers=not no_peers, options=tables)
    if plot_dir is not None:
        from streamrecall.devtools.bench import plots

        series = {"live system": result["hr_by_chunk"]} | {n: p["hr_by_chunk"] for n, p in result["peers"].items()}
        plots.per_chunk(plot_dir / "evaluate-hr-per-chunk.png", {n: [h for h in v if h is not None]
                                                                  for n, v in series.items()},
                        title=f"prequential HR@{k} per chunk ({result['stream']['events']:,} events)",
                        ylabel=f"HR@{k}")
    click.echo(json.dumps(result, indent=2) if as_json else ev.format_table(result))


class _LazyGroup(click.Group):
    """Subcommands imported only when called, so `streamrecall --help` does not import torch."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            return _show_envvars(importlib.import_module(self.lazy[name]).command)
        return super().get_command(ctx, name)


@main.group(cls=_LazyGroup, lazy={
    "ingest": "streamrecall.devtools.bench.ingest",
    "freshness": "streamrecall.devtools.bench.freshness",
    "query": "streamrecall.devtools.bench.query",
    "all": "streamrecall.devtools.bench.all",
    "index": "streamrecall.devtools.bench.index",
    "train": "streamrecall.devtools.bench.train",
    "model-eval": "streamrecall.devtools.bench.model_eval",
    "scale": "streamrecall.devtools.bench.scale",
    "shards": "streamrecall.devtools.bench.shards",
})
def bench() -> None:
    """Benchmarks; each prints ratios against the raw library measured in the same run."""


def _add_query() -> None:
    from streamrecall.ops.query import command as query_command  # urllib and click only: cheap to import

    main.add_command(query_command, "query")


_add_query()

if __name__ == "__main__":
    main()
