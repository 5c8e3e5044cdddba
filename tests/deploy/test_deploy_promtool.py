"""deploy/prometheus checked by Prometheus's own promtool: config, rules, and rule unit tests.

promtool comes with Debian's prometheus package (`bash scripts/ensure-prometheus.sh`, which
`make test` runs); without it these tests are skipped, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
RULE_FILES = [PROM / "recording_rules.yml", PROM / "alert_rules.yml"]
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (run `bash scripts/ensure-prometheus.sh`, as `make test` does)")


def promtool(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"promtool {result.args[1:]} failed:\n{result.stdout}\n{result.stderr}"


def test_compose_prometheus_config_is_valid() -> None:
    assert_ok(promtool("check", "config", PROM / "prometheus.yml"))


def test_rule_files_are_valid() -> None:
    assert_ok(promtool("check", "rules", *RULE_FILES))


def test_rule_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests under deploy/prometheus/tests"
    assert_ok(promtool("test", "rules", *UNIT_TESTS))


def test_k8s_prometheus_config_is_valid(tmp_path: Path) -> None:
    """The scrape config in deploy/k8s/60-prometheus-config.yaml, with the rules where it expects them."""
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "60-prometheus-config.yaml").read_text()))
    config = next(d for d in docs if d and d.get("kind") == "ConfigMap")["data"]["prometheus.yml"]
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for path in RULE_FILES:
        shutil.copy(path, rules_dir / path.name)
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/rules", str(rules_dir)))
    result = promtool("check", "config", tmp_path / "prometheus.yml")
    if result.returncode != 0 and "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without the Kubernetes discovery plugin.
        pytest.skip("this promtool was built without kubernetes_sd_configs (Debian's is); "
                    "the k8s scrape config is checked statically in test_deploy_static.py")
    assert_ok(result)
    assert "2 rule files found" in result.stdout
