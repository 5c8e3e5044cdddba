"""Static checks of deploy/: the Dockerfile, docker-compose.yml, the k8s manifests, the
Prometheus config and rules, and the Grafana dashboard — and that every metric they name
is one streamrecall/metrics.py defines (or a recording rule defined here)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamrecall.ops.supervisor import STOP_GRACE_S
from streamrecall.settings import ADMIN_PORT_OFFSET, DEFAULT_PORTS, ROLES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
STATE_DIR = "/var/lib/streamrecall"
PROBE_PATH = {"indexer": "/healthz", "trainer": "/metrics", "publisher": "/metrics"}
#: Liveness and start-up ask /livez, which answers from the poll loop's progress (not /healthz: it
#: answers 503 while the indexer lags, and a liveness probe on it would kill an indexer catching up).
LIVENESS_PATH = {"indexer": "/livez", "trainer": "/livez", "publisher": "/livez"}
#: The longest start-up the bounds allow (dead-letter read 60 s, model-update scan or replay 120 s,
#: the items table or model-updates catch-up 120 s): the startupProbe must wait at least this long.
STARTUP_BOUND_S = 300
#: Where each role's /metrics is: the indexer's on its admin port, apart from the recall API.
METRICS_PORTS = {**DEFAULT_PORTS, "indexer": DEFAULT_PORTS["indexer"] + ADMIN_PORT_OFFSET,
                 "router": DEFAULT_PORTS["router"] + ADMIN_PORT_OFFSET}
EXPECTED_ALERTS = {
    "StreamrecallRoleDown", "StreamrecallConsumerLagHigh", "StreamrecallFreshnessSLOBreached",
    "StreamrecallDeadLetterRateHigh", "StreamrecallModelUpdatesStalled", "StreamrecallIndexRecallLow",
    "StreamrecallCheckpointStale", "StreamrecallServingOverlapLow", "StreamrecallModelUpdatePublishFailing",
    "StreamrecallModelVersionSkew", "StreamrecallModelUpdatesRefused", "StreamrecallPollLoopStalled",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- metric names ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def allowed_names(sample_names, recording_rules) -> set[str]:
    """Series a query may name: metrics.py samples, recorded series, Prometheus's own `up`."""
    return set(sample_names) | {r["record"] for r in recording_rules} | {"up"}


def test_families_read_from_metrics_py(families) -> None:
    # Sanity: the registry walk finds the families the roles rely on, with the exposed names.
    assert "streamrecall_records_consumed_total" in families
    assert families["streamrecall_index_freshness_seconds"].type == "histogram"
    assert families["streamrecall_consumer_lag_records"].labels == ("role", "topic", "partition")


def test_recording_rules_use_known_metrics(recording_rules, sample_names, promql_names_of) -> None:
    recorded: set[str] = set()
    for rule in recording_rules:
        names = promql_names_of(rule["expr"])
        assert names, f"{rule['record']}: selects no metric"
        unknown = names - set(sample_names) - recorded
        assert not unknown, f"recording rule {rule['record']} names metrics not in streamrecall/metrics.py: {unknown}"
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), \
            f"{rule['record']}: not level:metric:operations"
        recorded.add(rule["record"])
    assert len(recorded) == len(recording_rules), "a recording rule name is defined twice"


def test_alert_rules_use_known_metrics(alert_rules, allowed_names, promql_names_of) -> None:
    for rule in alert_rules:
        unknown = promql_names_of(rule["expr"]) - allowed_names
        assert not unknown, f"alert {rule['alert']} names unknown metrics: {unknown}"


def test_dashboard_uses_known_metrics(panel_queries, allowed_names, promql_names_of) -> None:
    for title, ref, expr in panel_queries:
        unknown = promql_names_of(expr) - allowed_names
        assert not unknown, f"panel {title!r} query {ref} names unknown metrics: {unknown}"


def test_dashboard_shows_every_metric_family(panel_queries, recording_rules, families, sample_names,
                                             promql_names_of) -> None:
    """Each family of metrics.py appears on the dashboard, directly or through a recording rule."""
    rule_exprs = {r["record"]: r["expr"] for r in recording_rules}
    shown: set[str] = set()
    for _, _, expr in panel_queries:
        for name in promql_names_of(expr):
            if name in rule_exprs:
                shown |= {sample_names[n].name for n in promql_names_of(rule_exprs[name]) if n in sample_names}
            elif name in sample_names:
                shown.add(sample_names[name].name)
    assert not set(families) - shown, f"families with no panel: {sorted(set(families) - shown)}"


# --- the Grafana dashboard and provisioning ------------------------------------------------------
def test_dashboard_is_valid_and_every_panel_has_a_query(dashboard, panels) -> None:
    assert dashboard["uid"] == "streamrecall" and dashboard["title"]
    assert panels, "dashboard has no panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), f"{panel['title']}: gridPos incomplete"
        assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: not on the datasource variable"
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            expr = target.get("expr", "").strip()
            assert expr, f"panel {panel['title']!r} query {target.get('refId')} is empty"
            # The live test runs these as they are: no Grafana variables in expressions.
            assert "$" not in expr, f"panel {panel['title']!r}: Grafana variable in {expr!r}"


def test_dashboard_covers_the_required_views(panels) -> None:
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("item event", "click", "consumed", "lag", "dead", "loss", "steps", "examples", "model version",
                 "items", "deleted", "stale", "recall@10", "query latency"):
        assert word in titles, f"no panel about {word!r}"


def test_grafana_provisioning() -> None:
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrecall.yml")
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --- Prometheus config and rules ----------------------------------------------------------------
def test_prometheus_config_scrapes_every_role() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    for role in ROLES:
        job = jobs[f"streamrecall-{role}"]
        (static,) = job["static_configs"]
        assert static["targets"][0] == f"{role}:{METRICS_PORTS[role]}"
        for target in static["targets"]:  # the trainer job's other ranks are services trainer-1, ...
            host = target.split(":")[0]
            assert host.split("-")[0] == role and host in compose["services"], f"target {target} is no compose service"
        # A target label `role` would clash with the metrics' own and rename it to exported_role.
        assert "role" not in static.get("labels", {})
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_alerts_are_complete(alert_rules) -> None:
    assert {r["alert"] for r in alert_rules} == EXPECTED_ALERTS
    for rule in alert_rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        assert "for" in rule, f"{rule['alert']}: no `for`, it would fire on one bad evaluation"


def _unit_tests() -> list[dict[str, Any]]:
    return [t for path in sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
            for t in load_yaml(path)["tests"]]


def test_every_alert_has_a_firing_and_a_quiet_unit_test(alert_rules) -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules}
    assert not names - firing, f"alerts never tested firing: {names - firing}"
    assert not names - quiet, f"alerts never tested not firing: {names - quiet}"


def test_every_recording_rule_has_a_unit_test(recording_rules, promql_names_of) -> None:
    tested = {name for test in _unit_tests() for case in test.get("promql_expr_test", [])
              for name in promql_names_of(case["expr"])}
    missing = {r["record"] for r in recording_rules} - tested
    assert not missing, f"recording rules without a promql_expr_test: {sorted(missing)}"


# --- Dockerfile ----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for op, rest in instructions if op == "FROM"]
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    assert all(s.startswith("${PYTHON_IMAGE}") for s in stages), stages
    runs = [rest for op, rest in instructions if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "download.pytorch.org/whl/cpu" in runs[torch_at], "torch must come from the CPU index"
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < package_at, "torch (CPU) must be installed before the package"
    # Every source directory pyproject maps into the package is copied into the image.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {src for op, rest in instructions if op == "COPY" and "--from" not in rest for src in rest.split()[:-1]}
    for source in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert source in copied, f"Dockerfile does not copy {source}/"
        assert (REPO / source).is_dir()
    assert {"README.md", "pyproject.toml"} <= copied, "pip install . needs pyproject.toml and its readme"
    # Runtime stage: non-root user, state volume, entrypoint.
    runtime = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert any(op == "VOLUME" and STATE_DIR in rest for op, rest in runtime)
    assert any(op == "ENV" and f"STREAMRECALL_STATE_DIR={STATE_DIR}" in rest for op, rest in runtime)
    assert ("ENTRYPOINT", '["streamrecall"]') in runtime
    exposed = {int(p) for op, rest in runtime if op == "EXPOSE" for p in rest.split()}
    assert exposed == set(DEFAULT_PORTS.values()) | set(METRICS_PORTS.values())


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in lines, "exclude everything by default"
    for source in ("streamrecall/", "consumers/", "model/", "index/", "pyproject.toml", "README.md"):
        assert f"!{source}" in lines


# --- docker-compose -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "docker-compose.yml")


def test_compose_kafka_is_kraft(compose) -> None:
    services = compose["services"]
    assert not any("zookeeper" in name for name in services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert kafka["healthcheck"]["test"]


def test_compose_topics_job(compose) -> None:
    topics = compose["services"]["topics"]
    assert topics["command"] == ["topics", "create"]
    assert topics["environment"]["STREAMRECALL_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("role", ROLES)
def test_compose_role(compose, role: str) -> None:
    service = compose["services"][role]
    port = DEFAULT_PORTS[role]
    assert service["command"] == ["run", role]
    if role == "indexer":  # Prometheus scrapes the admin port; it is set, and published on loopback only
        admin = METRICS_PORTS[role]
        assert int(service["environment"]["STREAMRECALL_ADMIN_PORT"]) == admin
        assert f"127.0.0.1:{admin}:{admin}" in service["ports"]
    assert service["build"]["context"] == ".." and (DEPLOY.parent / service["build"]["dockerfile"]).is_file()
    env = service["environment"]
    assert env["STREAMRECALL_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["STREAMRECALL_HTTP_HOST"] == "0.0.0.0"
    assert int(env["STREAMRECALL_HTTP_PORT"]) == port
    assert env["STREAMRECALL_STATE_DIR"] == STATE_DIR
    assert any(str(p).endswith(f":{port}:{port}") or str(p) == f"{port}:{port}" for p in service["ports"])
    (volume,) = service["volumes"]
    name, mount = volume.split(":")[:2]
    assert mount == STATE_DIR and name in compose["volumes"], "state must live on a named volume"
    assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    check = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{port}{PROBE_PATH[role]}" in check


def test_compose_volumes_are_not_shared_between_roles(compose) -> None:
    volumes = [compose["services"][r]["volumes"][0].split(":")[0] for r in ROLES]
    assert len(set(volumes)) == len(ROLES)


def test_compose_monitoring(compose) -> None:
    prometheus = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus:/etc/prometheus") for v in prometheus["volumes"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    for volume in prometheus["volumes"] + compose["services"]["grafana"]["volumes"]:
        if volume.startswith("./"):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume


# --- Kubernetes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def find(k8s, kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in k8s if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def test_k8s_manifests_are_well_formed(k8s) -> None:
    assert k8s[0]["kind"] == "Namespace", "the namespace must be applied first (file-name order)"
    namespace = k8s[0]["metadata"]["name"]
    seen = set()
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc["__file__"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['__file__']}: {doc['kind']} namespace"
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)


def test_k8s_manifests_match_the_kubernetes_schema(k8s) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (optional: "
                             "pip install kubernetes-validate); the structural checks here still run")
    for doc in k8s:
        body = {k: v for k, v in doc.items() if k != "__file__"}
        kv.validate(body, "1.30", strict=True)


def test_k8s_settings(k8s) -> None:
    settings = find(k8s, "ConfigMap", "streamrecall-settings")["data"]
    assert settings["STREAMRECALL_HTTP_HOST"] == "0.0.0.0"
    assert settings["STREAMRECALL_STATE_DIR"] == STATE_DIR
    host, _, port = settings["STREAMRECALL_BOOTSTRAP_SERVERS"].rpartition(":")
    assert host and port.isdigit()
    config = find(k8s, "ConfigMap", "streamrecall-config")["data"]["config.toml"]
    parsed = tomllib.loads(config)
    assert settings["STREAMRECALL_CONFIG"].endswith("/config.toml") and "model" in parsed
    # Every setting in the ConfigMap is one the CLI reads.
    from streamrecall.ops.cli import SETTING_OPTIONS, env_name

    known = {env_name(name) for _, name, _, _ in SETTING_OPTIONS} | {"STREAMRECALL_CONFIG"}
    assert not set(settings) - known, f"unknown settings: {set(settings) - known}"


def test_k8s_topics_job(k8s) -> None:
    job = find(k8s, "Job", "streamrecall-topics")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["topics", "create"]
    assert {"configMapRef": {"name": "streamrecall-settings"}} in container["envFrom"]


def _container(statefulset: dict[str, Any]) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("role", ROLES)
def test_k8s_role(k8s, role: str) -> None:
    sts = find(k8s, "StatefulSet", f"streamrecall-{role}")
    spec = sts["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == role
    if role == "trainer":  # one data-parallel job: a pod per rank, its ordinal the rank
        trainer_env = {e["name"]: e for e in _container(sts)["env"]}
        assert spec["replicas"] == int(trainer_env["STREAMRECALL_WORLD_SIZE"]["value"])
        assert trainer_env["STREAMRECALL_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['apps.kubernetes.io/pod-index']"
        assert trainer_env["STREAMRECALL_MASTER_ADDR"]["value"].startswith(f"{sts['metadata']['name']}-0.")
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= 30, "roles checkpoint on SIGTERM"
    if role != "router":  # the roles with state: `streamrecall up` gives them the same grace
        assert pod["terminationGracePeriodSeconds"] == STOP_GRACE_S
    container = _container(sts)
    assert container["args"] == ["run", role]
    assert {"configMapRef": {"name": "streamrecall-settings"}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = DEFAULT_PORTS[role]
    assert int(env["STREAMRECALL_HTTP_PORT"]) == port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    if role == "indexer":
        assert ports["admin"] == METRICS_PORTS[role] == int(env["STREAMRECALL_ADMIN_PORT"])
    for probe, paths in (("readinessProbe", PROBE_PATH), ("livenessProbe", LIVENESS_PATH),
                         ("startupProbe", LIVENESS_PATH)):
        get = container[probe]["httpGet"]
        assert get["path"] == paths[role] and get["port"] in ("http", port), f"{role} {probe}"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BOUND_S, f"{role}: start-up not covered"
    # State on a PersistentVolumeClaim, mounted where STREAMRECALL_STATE_DIR points.
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == STATE_DIR and "state" in claims
    assert claims["state"]["spec"]["resources"]["requests"]["storage"]
    # Every volume the container mounts exists (a claim or a pod volume).
    volumes = {v["name"] for v in pod.get("volumes", [])} | set(claims)
    assert set(mounts) <= volumes
    # Prometheus annotations point at the same port.
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORTS[role]


@pytest.mark.parametrize("role", ROLES)
def test_k8s_every_role_has_a_service(k8s, role: str) -> None:
    sts = find(k8s, "StatefulSet", f"streamrecall-{role}")
    governing = find(k8s, "Service", sts["spec"]["serviceName"])
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    services = [d for d in k8s if d["kind"] == "Service"
                and d["spec"]["selector"].items() <= pod_labels.items()]
    assert governing in services
    for service in services:
        targets = {p["targetPort"] for p in service["spec"]["ports"]}
        assert targets & {"http", DEFAULT_PORTS[role]}, service["metadata"]["name"]
    if role == "indexer":  # clients reach the recall API only: the admin port is no client Service's
        recall = find(k8s, "Service", "streamrecall-recall")
        assert [p["targetPort"] for p in recall["spec"]["ports"]] == ["http"]
    if role == "indexer":
        assert any(s["spec"].get("clusterIP") != "None" for s in services), "the recall API needs a ClusterIP"


def test_k8s_prometheus_scrape_config(k8s) -> None:
    config = yaml.safe_load(find(k8s, "ConfigMap", "streamrecall-prometheus")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {f"streamrecall-{role}" for role in (*ROLES, "indexer-shard", "router")}
    for role in ROLES:
        keep = [r for r in jobs[f"streamrecall-{role}"]["relabel_configs"] if r.get("action") == "keep"]
        assert any(r["regex"].endswith(role) for r in keep), f"job for {role} does not keep {role} pods"
        port_name = "admin" if role == "indexer" else "http"
        assert any(r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"] and r["regex"] == port_name
                   for r in keep), f"job for {role} does not scrape the {port_name} port"
    assert config["rule_files"]


def test_k8s_network_policy_keeps_the_admin_port_for_prometheus(k8s) -> None:
    policy = find(k8s, "NetworkPolicy", "streamrecall-indexer")["spec"]
    sts = find(k8s, "StatefulSet", "streamrecall-indexer")
    assert policy["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: rule for rule in policy["ingress"] for p in rule["ports"]}
    assert set(by_port) == {"http", "admin"}
    assert "from" not in by_port["http"], "the recall API is open to the cluster"
    (source,) = by_port["admin"]["from"]
    assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


# --- a sharded index and its router (compose profile "scale-out", k8s 33- and 34-) -------------------
def test_compose_scale_out_has_two_shards_and_a_router(compose) -> None:
    from streamrecall.consumers.roles.router.fanout import parse_shard_urls

    services = compose["services"]
    router = services["router"]
    urls = parse_shard_urls(router["environment"]["STREAMRECALL_SHARD_URLS"])
    assert len(urls) == 2
    volumes = set()
    for i, (replica,) in enumerate(urls):
        shard = services[f"indexer-shard-{i}"]
        assert shard["profiles"] == ["scale-out"]
        assert shard["command"] == ["run", "indexer", "--shard", str(i), "--shards", "2"]
        port = int(shard["environment"]["STREAMRECALL_HTTP_PORT"])
        assert replica == f"http://indexer-shard-{i}:{port}", "the router asks each shard in shard order"
        assert f"127.0.0.1:{port}/healthz" in " ".join(shard["healthcheck"]["test"])
        assert "ports" not in shard, "clients query the router, not a shard"
        (volume,) = shard["volumes"]
        volumes.add(volume.split(":")[0])
    assert len(volumes) == 2 and volumes <= set(compose["volumes"]), "each shard its own snapshot volume"
    assert volumes.isdisjoint(v.split(":")[0] for r in ROLES for v in services[r]["volumes"])
    assert router["command"] == ["run", "router"] and router["profiles"] == ["scale-out"]
    assert "volumes" not in router, "the router is stateless"
    port, admin = DEFAULT_PORTS["router"], METRICS_PORTS["router"]
    env = router["environment"]
    assert (int(env["STREAMRECALL_HTTP_PORT"]), int(env["STREAMRECALL_ADMIN_PORT"])) == (port, admin)
    assert {f"127.0.0.1:{port}:{port}", f"127.0.0.1:{admin}:{admin}"} == set(router["ports"])
    assert f"127.0.0.1:{port}/healthz" in " ".join(router["healthcheck"]["test"])


def test_k8s_statefulset_ordinal_is_the_shard_and_the_router_asks_each(k8s) -> None:
    from streamrecall.consumers.roles.router.fanout import parse_shard_urls

    sts = find(k8s, "StatefulSet", "streamrecall-indexer-shard")
    container = _container(sts)
    assert container["args"] == ["run", "indexer"]
    env = {e["name"]: e for e in container["env"]}
    shards = int(env["STREAMRECALL_SHARDS"]["value"])
    assert sts["spec"]["replicas"] == shards, "one pod per shard: the ordinal is the shard"
    assert env["STREAMRECALL_SHARD"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "indexer-shard"
    for service in (d for d in k8s if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()):
        assert service["spec"].get("clusterIP") == "None", "no client Service load-balances over shards"
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["state"] == STATE_DIR and "state" in claims
    governing = find(k8s, "Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]

    router = find(k8s, "Deployment", "streamrecall-router")
    rc = _container(router)
    assert rc["args"] == ["run", "router"] and {"configMapRef": {"name": "streamrecall-settings"}} in rc["envFrom"]
    renv = {e["name"]: e.get("value") for e in rc["env"]}
    urls = parse_shard_urls(renv["STREAMRECALL_SHARD_URLS"])
    assert urls == [[f"http://{sts['metadata']['name']}-{i}.{governing['metadata']['name']}:{http}"]
                    for i in range(shards)], "shard I is the pod of ordinal I"
    ports = {p["name"]: p["containerPort"] for p in rc["ports"]}
    assert ports == {"http": DEFAULT_PORTS["router"], "admin": METRICS_PORTS["router"]}
    assert (int(renv["STREAMRECALL_HTTP_PORT"]), int(renv["STREAMRECALL_ADMIN_PORT"])) == (ports["http"], ports["admin"])
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        assert rc[probe]["httpGet"]["path"] == path
    service = find(k8s, "Service", "streamrecall-router")
    assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert int(router["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == ports["admin"]
    # The shards' recall port answers the routers only; the admin ports Prometheus only.
    shard_policy = find(k8s, "NetworkPolicy", "streamrecall-indexer-shard")["spec"]
    by_port = {p["port"]: rule for rule in shard_policy["ingress"] for p in rule["ports"]}
    (source,) = by_port["http"]["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    router_policy = find(k8s, "NetworkPolicy", "streamrecall-router")["spec"]
    by_port = {p["port"]: rule for rule in router_policy["ingress"] for p in rule["ports"]}
    assert "from" not in by_port["http"] and by_port["admin"]["from"][0]["podSelector"]["matchLabels"] == \
        {"app.kubernetes.io/name": "prometheus"}


def test_no_stray_files_in_deploy() -> None:
    # kubectl apply -f deploy/k8s/ must be able to apply every file in that directory.
    for path in (DEPLOY / "k8s").iterdir():
        assert path.suffix == ".yaml", f"{path.name}: kubectl apply -f deploy/k8s/ would read it"
    json.loads((DEPLOY / "grafana" / "dashboards" / "streamrecall.json").read_text())
