"""`streamrecall up`: the whole system on one machine, with a live status line.

Broker (embedded unless bootstrap servers are configured) → topics → one child
process per role (`streamrecall run ROLE`, restarted with a backoff if it dies) → a live
synthetic stream → a status line every few seconds. Ctrl-C or SIGTERM stops it all cleanly;
if `up` itself dies (SIGKILL included) its broker and roles die with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from streamrecall.atomicfile import atomic_write
from streamrecall.ops.supervisor import STOP_GRACE_S, RoleProcess
from streamrecall.settings import ROLES, Settings
from streamrecall.consumers.topics import create_topics

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0


def run_up(settings: Settings, roles: list[str], rate: float, duration: float | None, broker_port: int = 0) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    logs = settings.state_dir / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        if settings.bootstrap_servers is None:
            from streamrecall.devtools.broker import EmbeddedBroker  # the devtools extra

            broker = stack.enter_context(EmbeddedBroker(port=broker_port, log_path=logs / "broker.log"))
            settings = settings.replace(bootstrap_servers=broker.bootstrap_servers)
            click.echo(f"embedded broker on {broker.bootstrap_servers} (memory only)")
        create_topics(settings)
        children = []
        for role in roles:
            # One --http-port for `up` is a base: each role gets its own port above it.
            role_settings = (settings if settings.http_port is None
                             else settings.replace(http_port=settings.http_port + ROLES.index(role)))
            child = RoleProcess(role, role_settings, logs / f"{role}.log")
            child.start()
            children.append(child)
        # Roles stop together (each flushes in parallel), before the broker they flush to. Should
        # `up` itself be killed meanwhile, the children die with it (streamrecall/ops/lifeline.py).
        stack.callback(_stop_all, children)
        counts: Counter[str] = Counter()
        if rate > 0:
            generator = threading.Thread(target=_live_stream, args=(settings, rate, stop, counts),
                                         name="generator", daemon=True)
            generator.start()
        click.echo(f"up: roles {[c.role for c in children]}, {rate:g} clicks/s; Ctrl-C stops "
                   f"(state in {settings.state_dir}, logs in {logs})")
        for child in children:
            base = f"http://{child.settings.http_host}:{child.settings.port_for(child.role)}"
            click.echo(f"  {child.role:<9} {base}/metrics" + (f"   recall API: {base}/recall?user_id=U&k=10, "
                                                             f"{base}/healthz" if child.role == "indexer" else ""))
        write_address(settings, {c.role: c.settings.port_for(c.role) for c in children})
        stack.callback(clear_address, settings)
        started = time.monotonic()
        next_status = started + STATUS_EVERY_S
        while not stop.wait(0.5):
            for child in children:
                child.check()
            if time.monotonic() >= next_status:
                next_status += STATUS_EVERY_S
                click.echo(_status_line(children, counts, time.monotonic() - started))
            if duration is not None and time.monotonic() - started >= duration:
                break
        stop.set()
        click.echo("stopping: roles flush, snapshot and commit")


def _stop_all(children: list[RoleProcess], timeout_s: float = STOP_GRACE_S) -> None:
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.stop(timeout_s=max(0.1, deadline - time.monotonic()))


ADDRESS_FILE = "up.json"


def write_address(settings: Settings, ports: dict[str, int]) -> None:
    """Record where this `up` serves (broker, role ports, pid) in the state dir, so `status` and
    `query` run beside it find the embedded broker, whose port is picked at start."""
    data = {"pid": os.getpid(), "bootstrap_servers": settings.bootstrap_servers,
            "http_host": settings.http_host, "ports": ports}
    atomic_write(settings.state_dir / ADDRESS_FILE, json.dumps(data).encode())


def clear_address(settings: Settings) -> None:
    (settings.state_dir / ADDRESS_FILE).unlink(missing_ok=True)


def running_address(state_dir: Path) -> dict[str, Any] | None:
    """What a running `up` with this state dir recorded (None: none, or its process is gone)."""
    try:
        data = json.loads((state_dir / ADDRESS_FILE).read_text())
        os.kill(int(data["pid"]), 0)  # signal 0: only checks that the process exists
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data.get("bootstrap_servers"), str) else None


def _live_stream(settings: Settings, rate: float, stop: threading.Event, counts: Counter[str]) -> None:
    """Endless synthetic stream: ten-minute epochs of stream time, each with new items appearing
    as it goes; later epochs (new seeds) re-create the same ids, i.e. item updates."""
    from streamrecall.devtools.livestream import produce_stream
    from streamrecall.devtools.synthetic import SyntheticConfig, generate

    epoch = 0
    try:
        while not stop.is_set():
            config = SyntheticConfig(n_items=2_000, n_users=1_000, n_clicks=max(1000, int(rate * 600)),
                                     seed=7 + epoch, clicks_per_second=max(rate, 1.0))
            produce_stream(settings, generate(config), rate_per_s=rate, stop=stop, counts=counts, restamp=True)
            epoch += 1
    except Exception:  # the status line shows the generator stopped; the roles keep running
        log.exception("live generator failed")


def _status_line(children: list[RoleProcess], counts: Counter[str], elapsed: float) -> str:
    roles = " ".join(f"{c.role}:{'up' if c.alive else 'DOWN'}{f'(restarts {c.restarts})' if c.restarts else ''}"
                     for c in children)
    return (f"[{elapsed:6.0f}s] produced items={counts['items']:,} clicks={counts['clicks']:,} | {roles}"
            + _indexer_summary(children))


def _indexer_summary(children: list[RoleProcess]) -> str:
    indexer = next((c for c in children if c.role == "indexer"), None)
    if indexer is None:
        return ""
    import json
    import urllib.request

    url = f"http://{indexer.settings.http_host}:{indexer.settings.port_for('indexer')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            h = json.loads(r.read())
        return f" | index: {h.get('items', '?')} items, model v{h.get('model_version', '?')}"
    except (OSError, ValueError):
        return " | index: starting"
