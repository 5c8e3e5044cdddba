"""A whole streamrecall system on this machine, driven from outside its processes.

Used by `streamrecall evaluate`, the freshness benchmarks and the fault-injection suite:
an embedded broker (unless one is given), topics under a fresh prefix, each role as its
own child process, and the indexer's public HTTP API. Everything it starts stops with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import msgspec

from streamrecall.devtools.broker import EmbeddedBroker, free_port
from streamrecall.consumers.clients import make_producer
from streamrecall.errors import StreamrecallError
from streamrecall.settings import ROLES, Settings
from streamrecall.ops.status import group_lags
from streamrecall.ops.supervisor import RoleProcess
from streamrecall.consumers.topics import create_topics

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


def write_model_toml(path: Path, model: dict[str, Any], tables: dict[str, dict[str, Any]] | None = None) -> Path:
    """A settings file holding a ``[model]`` table and optional role tables (numbers and booleans)."""
    lines = []
    for name, values in {"model": model, **(tables or {})}.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            value = str(v).lower() if isinstance(v, bool) else repr(v)  # TOML booleans are lower case
            lines.append(f"{k} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


class LocalSystem:
    """Broker + topics + role processes. Use as a context manager."""

    def __init__(self, state_dir: Path, *, bootstrap_servers: str | None = None, roles: Iterable[str] = ROLES,
                 model: dict[str, Any] | None = None, partitions: int = 4, name: str = "sys",
                 flush_interval_ms: int = 100, options: dict[str, dict[str, Any]] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.state_dir = state_dir
        self.bootstrap_servers = bootstrap_servers
        self.roles = list(roles)
        self.model = model or {}
        self.partitions = partitions
        self.name = name
        self.flush_interval_ms = flush_interval_ms
        self.options = options or {}  # role tables of the settings file: {"trainer": {...}, "indexer": {...}}
        self.overrides = settings or {}  # top-level settings for every role, e.g. {"model_signing_key": ...}
        self.processes: dict[str, RoleProcess] = {}
        self.settings: Settings | None = None
        self.broker: EmbeddedBroker | None = None  # the embedded broker, when this system started one
        self._stack = ExitStack()
        self._producer: Any = None

    # --- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "LocalSystem":
        try:
            self.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        if self.bootstrap_servers is None:
            self.broker = self._stack.enter_context(EmbeddedBroker(log_path=self.state_dir / "logs" / "broker.log"))
            self.bootstrap_servers = self.broker.bootstrap_servers
        tag = f"{self.name}-{uuid.uuid4().hex[:6]}"
        config = (write_model_toml(self.state_dir / "streamrecall.toml", self.model, self.options)
                  if self.model or self.options else None)
        base = Settings(bootstrap_servers=self.bootstrap_servers, topic_prefix=f"{tag}.", group_prefix=tag,
                        state_dir=self.state_dir, partitions=self.partitions,
                        flush_interval_ms=self.flush_interval_ms, **self.overrides)
        self.settings = Settings.from_sources(
            {k: v for k, v in base.__dict__.items() if k not in ("extra", "config_file")}, config)
        create_topics(self.settings)
        self._producer = make_producer(self.settings)
        self._stack.callback(self._producer.close, 10)
        for role in self.roles:
            self.add_role(role)

    def add_role(self, role: str, name: str | None = None, args: tuple[str, ...] = (),
                 state_dir: Path | None = None, group_prefix: str | None = None) -> RoleProcess:
        """Start (another) process of ``role``; each gets its own HTTP port. ``state_dir`` and
        ``group_prefix`` give it its own state (a replay into a fresh directory) and group."""
        assert self.settings is not None
        name = name or role
        changes: dict[str, Any] = {"http_port": free_port(), "admin_port": free_port()}
        if state_dir is not None:
            changes["state_dir"] = state_dir
        if group_prefix is not None:
            changes["group_prefix"] = group_prefix
        proc = RoleProcess(role, self.settings.replace(**changes), self.state_dir / "logs" / f"{name}.log", args=args)
        proc.start()
        self._stack.callback(proc.stop)
        self.processes[name] = proc
        return proc

    def stop_role(self, name: str) -> None:
        self.processes.pop(name).stop()

    # --- data in -------------------------------------------------------------
    def produce(self, events: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
        """Produce (topic, key, value) events ("items"/"clicks") and flush; returns the count."""
        assert self.settings is not None
        physical = {"items": self.settings.topics.items, "clicks": self.settings.topics.clicks}
        n = 0
        for topic, key, value in events:
            self._producer.send(physical[topic], key=key.encode(), value=_encode(value))
            n += 1
        self._producer.flush(timeout=60)
        return n

    def produce_raw(self, topic: str, key: bytes | None, value: bytes | None,
                    headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> Any:
        """Send raw bytes to a physical topic; returns the send's future (its metadata has the offset)."""
        return self._producer.send(topic, key=key, value=value, headers=headers or None, partition=partition)

    def flush(self) -> None:
        self._producer.flush(timeout=60)

    # --- observing ---------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise if a role process exited on its own, quoting the end of its log."""
        for name, proc in self.processes.items():
            if not proc.stopped_on_purpose and proc.process is not None and proc.process.poll() is not None:
                tail = proc.log_path.read_text(errors="replace").splitlines()[-5:] if proc.log_path.exists() else []
                raise StreamrecallError(f"{name} exited with status {proc.process.returncode}; "
                                        f"its log ({proc.log_path}) ends:\n" + "\n".join(tail))

    def total_lag(self) -> int:
        assert self.settings is not None
        groups = {p.settings.group_id(p.role) for p in self.processes.values()}
        return sum(r.lag for r in group_lags(self.settings) if r.group in groups)

    def wait_caught_up(self, timeout_s: float = 120.0, settle_s: float = 0.5) -> bool:
        """Wait until every running role's group has zero lag twice in a row (effects ripple:
        clicks → model updates → vectors), or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        zero_in_a_row = 0
        while time.monotonic() < deadline:
            self.check_alive()
            if self.total_lag() == 0:
                zero_in_a_row += 1
                if zero_in_a_row >= 2:
                    return True
            else:
                zero_in_a_row = 0
            time.sleep(settle_s)
        return False

    def read_topic(self, topic: str, timeout_s: float = 120.0) -> list[Any]:
        """Every record of physical ``topic``, read to the fetch high watermark of each partition,
        in (partition, offset) order (for tests and tools that check what went onto a topic)."""
        from kafka import TopicPartition

        from streamrecall.consumers.clients import make_consumer

        assert self.settings is not None
        c = make_consumer(self.settings, None)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
            c.assign(tps)
            c.seek_to_beginning(*tps)
            out: list[Any] = []
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for messages in c.poll(timeout_ms=200, max_records=10_000).values():
                    out.extend(messages)
                if all(c.highwater(tp) is not None and c.position(tp) >= c.highwater(tp) for tp in tps):
                    break
            else:
                raise StreamrecallError(f"could not read {topic} to its end in {timeout_s:.0f}s")
            return sorted(out, key=lambda m: (m.partition, m.offset))
        finally:
            c.close(autocommit=False)

    def metric(self, family: str, name: str, **labels: str) -> float | None:
        """A sample of ``family`` with ``labels`` from role process ``name``'s /metrics (None until it
        answers or has that series)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.api(name, admin=self.processes[name].role in ("indexer", "router")) + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def api(self, name: str = "indexer", admin: bool = False) -> str:
        """The role's HTTP base URL; ``admin``: the indexer's admin listener (/metrics, vectors)."""
        proc = self.processes[name]
        port = proc.settings.admin_port_for(proc.role) if admin else proc.settings.port_for(proc.role)
        return f"http://{proc.settings.http_host}:{port}"

    def get(self, path: str, name: str = "indexer", timeout_s: float = 5.0, admin: bool = False) -> tuple[int, Any]:
        """GET the role's HTTP API (``admin``: the indexer's admin port); returns (status, decoded JSON or text)."""
        return self._request(urllib.request.Request(self.api(name, admin) + path), timeout_s)

    def post(self, path: str, payload: Any, name: str = "indexer", timeout_s: float = 5.0) -> tuple[int, Any]:
        """POST ``payload`` as JSON to the role's HTTP API; returns (status, decoded JSON or text)."""
        return self._request(urllib.request.Request(self.api(name) + path, data=json.dumps(payload).encode(),
                                                    headers={"Content-Type": "application/json"}), timeout_s)

    @staticmethod
    def _request(req: urllib.request.Request, timeout_s: float) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode("utf-8", "replace")

    def recall(self, user_id: str, k: int, exclude_seen: bool = True) -> tuple[list[str], dict[str, Any]]:
        query = urllib.parse.urlencode({"user_id": user_id, "k": k, "exclude_seen": int(exclude_seen)})
        status, body = self.get(f"/recall?{query}")
        if status != 200:
            raise RuntimeError(f"/recall answered {status}: {body}")
        return [r["item_id"] for r in body["results"]], body

    def wait_healthy(self, timeout_s: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if self.get("/healthz")[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        return False


# --- `streamrecall up` as a whole, for tests that kill it ------------------------------------
_UP_PID_LINE = re.compile(r"(?:started (\w+)|embedded broker \(Tansu\) listening on \S+,) \(?pid (\d+)\)?")


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may wait for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def start_up(state: Path, rate: float = 0.0, timeout_s: float = 60.0) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """`streamrecall up` as a subprocess (embedded broker, every role); returns it and its children's
    pids (broker and roles) as it logged them once all four started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRECALL_")}
    env |= {"STREAMRECALL_STATE_DIR": str(state), "STREAMRECALL_HTTP_PORT": str(free_port())}
    up = subprocess.Popen([sys.executable, "-m", "streamrecall", "up", "--rate", str(rate)], env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pids: dict[str, int] = {}
    lines: list[str] = []

    def read() -> None:
        assert up.stderr is not None
        for line in up.stderr:
            lines.append(line)
            m = _UP_PID_LINE.search(line)
            if m:
                pids[m.group(1) or "broker"] = int(m.group(2))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while len(pids) < 4:
        if time.monotonic() > deadline or up.poll() is not None:
            up.kill()
            raise AssertionError("up did not start its broker and three roles:\n" + "".join(lines[-20:]))
        time.sleep(0.1)
    return up, pids
