"""The dashboard and the recording rules against a real Prometheus scraping a real `streamrecall up`.

`streamrecall up` runs the embedded broker, the topics, every implemented role and the live
synthetic stream, with `--http-port BASE` (role i of trainer, indexer, publisher serves on
BASE + i). A `prometheus` binary scrapes them every second with the scrape jobs of
deploy/prometheus/prometheus.yml (targets rewritten to those ports) and evaluates
deploy/prometheus/*_rules.yml every second. The test feeds a few malformed records (so dead
letters exist), new items stamped now and a few recall queries, then asks Prometheus's HTTP
API for every panel query and every recorded series until each has data.

A query that depends on a role this checkout does not implement yet is reported, not failed.
Everything started here is stopped when the test ends, also when it fails.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from streamrecall.settings import ADMIN_PORT_OFFSET, ROLES

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (run `bash scripts/ensure-prometheus.sh`)"),
]

UP_DURATION_S = 110  # a hard stop for `up`; the test normally ends it sooner
POLL_BUDGET_S = 85  # how long to wait for every query to have data, once Prometheus is ready
POLL_EVERY_S = 3.0
#: Metric families that only have series after something went wrong.
EXCUSED = {"streamrecall_transient_retries_total": "retries happen only after transient broker errors",
           "streamrecall_deadletters_unwritten_total": "dead letters are unwritten only when refused",
           **{f"streamrecall_router_{name}": "the router runs in front of a sharded index, not under `up`"
              for name in ("shard_requests_total", "shard_seconds", "incomplete_answers_total", "user_vectors")}}
#: Families of each metrics group, by which role emits them ("any": every role's runtime).
GROUP_ROLE = {"RuntimeMetrics": "any", "ModelVersionMetrics": "any", "StateMetrics": "any", "TrainerMetrics": "trainer",
              "IndexerMetrics": "indexer", "PublisherMetrics": "publisher", "QueryMetrics": "indexer",
              "RouterMetrics": "router"}


# --- processes ---------------------------------------------------------------------------------
def free_port_block(n: int) -> int:
    """A base port with base..base+n-1 all free on loopback (best effort)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {n} free ports found")


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process (it stops its own children), then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def start(stack: ExitStack, cmd: list[str], log: Path, grace_s: float, **kwargs: Any) -> subprocess.Popen[bytes]:
    out = stack.enter_context(open(log, "wb"))
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)
    stack.callback(stop_process_group, proc, grace_s)
    return proc


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, alive: subprocess.Popen[bytes],
             log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if alive.poll() is not None:
            pytest.fail(f"{what}: process exited with {alive.returncode}\n{tail(log)}")
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout_s:.0f}s\n{tail(log)}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"--- {path.name}: not written ---"


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (OSError, urllib.error.HTTPError):
        return None


# --- Prometheus ----------------------------------------------------------------------------------
def prometheus_config(base_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with 1 s intervals and the roles' loopback ports."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / name) for name in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        role = job["job_name"].removeprefix("streamrecall-")
        if role in ROLES:
            # the indexer's /metrics is on its admin port: its HTTP port + ADMIN_PORT_OFFSET
            port = base_port + ROLES.index(role) + (ADMIN_PORT_OFFSET if role == "indexer" else 0)
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
            jobs.append(job)
    assert [j["job_name"] for j in jobs] == [f"streamrecall-{r}" for r in ROLES]
    config["scrape_configs"] = jobs
    return config


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = http_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5)
    if body is None:
        return []
    answer = json.loads(body)
    assert answer["status"] == "success", f"{expr}: {answer}"
    result = answer["data"]["result"]
    return result if isinstance(result, list) else [{"value": result}]


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


# --- what to expect ------------------------------------------------------------------------------
def roles_needed(expr: str, promql_names_of, sample_names, rule_exprs: dict[str, str]) -> tuple[set[str], set[str]]:
    """(roles whose metrics the expression reads, excused families it reads)."""
    roles: set[str] = set()
    excused: set[str] = set()
    for name in promql_names_of(expr):
        if name in rule_exprs:
            more, exc = roles_needed(rule_exprs[name], promql_names_of, sample_names, rule_exprs)
            roles |= more
            excused |= exc
            if name == "role:streamrecall_model_version:skew":
                roles |= {"trainer", "indexer|publisher"}
        elif name in sample_names:
            family = sample_names[name]
            roles.add(GROUP_ROLE[family.group])
            if family.name in EXCUSED:
                excused.add(family.name)
    return roles, excused


# --- the test ------------------------------------------------------------------------------------
def test_every_panel_query_and_recording_rule_has_data(tmp_path: Path, panel_queries, recording_rules,
                                                       sample_names, promql_names_of) -> None:
    base = free_port_block(len(ROLES))
    prom_port = free_port_block(1)
    prom = f"http://127.0.0.1:{prom_port}"
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRECALL_")}
    env["PYTHONUNBUFFERED"] = "1"

    rule_exprs = {r["record"]: r["expr"] for r in recording_rules}
    queries = [(f"panel {title!r} {ref}", expr) for title, ref, expr in panel_queries]
    queries += [(f"recording rule {name}", name) for name in rule_exprs]

    with ExitStack() as stack:
        up_log = tmp_path / "up.log"
        up = start(stack, [sys.executable, "-m", "streamrecall", "up", "--duration", str(UP_DURATION_S),
                           "--rate", "100", "--state-dir", str(state), "--http-port", str(base),
                           "--topic-prefix", "", "--log-level", "INFO"],
                   up_log, grace_s=45, cwd=tmp_path, env=env)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(base), sort_keys=False))
        prom_log = tmp_path / "prometheus.log"
        prometheus = start(stack, [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}",
                                   "--storage.tsdb.retention.time=1h"], prom_log, grace_s=15)
        wait_for("prometheus ready", lambda: http_get(f"{prom}/-/ready") is not None, 30, prometheus, prom_log)
        wait_for("streamrecall up started its roles", lambda: "up: roles" in up_log.read_text(errors="replace"),
                 60, up, up_log)
        bootstrap = next(line.split(" on ", 1)[1].split()[0] for line in up_log.read_text().splitlines()
                         if line.startswith("embedded broker on "))
        producer = stack.enter_context(closing_producer(bootstrap))
        produce_malformed_records(producer)

        def worth_waiting_for(expr: str) -> bool:
            _, excused = roles_needed(expr, promql_names_of, sample_names, rule_exprs)
            return not excused

        with_data: dict[str, bool] = {label: False for label, _ in queries}
        latest: dict[str, dict[str, str]] = {}  # recorded series: their last values, for the report
        deadline = time.monotonic() + POLL_BUDGET_S
        while time.monotonic() < deadline:
            produce_fresh_items(producer, count=5)
            send_recall_queries(f"http://127.0.0.1:{base + ROLES.index('indexer')}")
            for label, expr in queries:
                if not with_data[label] or label.startswith("recording rule"):
                    result = query(prom, expr)
                    if has_data(result):
                        with_data[label] = True
                        latest[label] = {json.dumps(r.get("metric", {}), sort_keys=True): r["value"][1]
                                         for r in result}
            pending = [label for label, expr in queries if not with_data[label] and worth_waiting_for(expr)]
            if not pending:
                break
            if up.poll() is not None:
                break
            time.sleep(POLL_EVERY_S)

        logs = "\n".join(tail(p, 15) for p in [up_log, *sorted((state / "logs").glob("*.log"))])

    report = {"no data, excused": [], "no data": []}
    for label, expr in queries:
        if with_data[label]:
            continue
        _, excused = roles_needed(expr, promql_names_of, sample_names, rule_exprs)
        if excused:
            report["no data, excused"].append(f"{label} ({'; '.join(EXCUSED[f] for f in excused)})")
        else:
            report["no data"].append(label)
    report["recorded series, last values"] = {k: v for k, v in latest.items() if k.startswith("recording rule")}
    print(json.dumps(report, indent=2))
    assert any(with_data[f"panel {title!r} {ref}"] for title, ref, expr in panel_queries if "up{" in expr), \
        "Prometheus never scraped the role targets"
    assert not report["no data"], f"queries without data: {json.dumps(report['no data'], indent=2)}\n{logs}"


@contextmanager
def closing_producer(bootstrap: str) -> Iterator[Any]:
    from streamrecall.consumers.clients import make_producer
    from streamrecall.settings import Settings

    producer = make_producer(Settings(bootstrap_servers=bootstrap))
    try:
        yield producer
    finally:
        producer.close(timeout=10)


def produce_malformed_records(producer: Any) -> None:
    """Records that break the event contract, so the dead-letter series exist."""
    for i in range(5):
        producer.send("items", key=f"bad-item-{i}".encode(), value=b"\xff\xfe not json")
        producer.send("clicks", key=f"bad-user-{i}".encode(), value=b'{"user_id": 5}')
    producer.flush(timeout=30)


_fresh = itertools.count()


def produce_fresh_items(producer: Any, count: int) -> None:
    """New items stamped now. The synthetic stream of `up` creates its catalogue at the start and
    spreads new items over a billion clicks, so without these the freshness histogram stops moving
    once the first items are indexed (and its rate-based quantiles have no data)."""
    now_ms = int(time.time() * 1000)
    for _ in range(count):
        item_id = f"live-test-{next(_fresh)}"
        value = {"item_id": item_id, "created_at": now_ms, "title": "live test item", "categories": ["live-test"]}
        producer.send("items", key=item_id.encode(), value=json.dumps(value).encode())
    producer.flush(timeout=30)


def send_recall_queries(indexer: str) -> None:
    """A few recall queries, by user and by vector (errors count too: they are labelled by status)."""
    for i in range(1, 4):
        http_get(f"{indexer}/recall?" + urllib.parse.urlencode({"user_id": f"user-{i:07d}", "k": 10}), timeout=2)
    request = urllib.request.Request(f"{indexer}/recall", data=json.dumps({"vector": [0.125] * 64, "k": 10}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            response.read()
    except (OSError, urllib.error.HTTPError):
        pass
