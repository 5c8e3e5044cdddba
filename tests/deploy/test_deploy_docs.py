"""docs/deployment.md stays in step with the code: its metrics table lists every family of
streamrecall/metrics.py with its type and labels, and every alert and recording rule is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def metric_rows(doc: str) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """{name: (type, labels, meaning)} from the table rows that start with a streamrecall_ metric."""
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`streamrecall_\w+`", cells[0]):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} listed twice"
        labels = tuple(re.findall(r"`(\w+)`", cells[2]))
        rows[name] = (cells[1], labels, cells[3])
    return rows


def test_metrics_table_lists_every_family(doc, families) -> None:
    rows = metric_rows(doc)
    missing = set(families) - set(rows)
    assert not missing, f"docs/deployment.md metrics table lacks {sorted(missing)}"
    extra = set(rows) - set(families)
    assert not extra, f"docs/deployment.md lists metrics that streamrecall/metrics.py does not define: {sorted(extra)}"
    for name, family in families.items():
        type_, labels, meaning = rows[name]
        assert type_ == family.type, f"{name}: documented as {type_}, defined as {family.type}"
        assert labels == family.labels, f"{name}: documented labels {labels}, defined {family.labels}"
        assert meaning, f"{name}: no meaning given"


def test_every_alert_and_recording_rule_is_documented(doc, alert_rules, recording_rules) -> None:
    for rule in alert_rules:
        assert f"`{rule['alert']}`" in doc, f"alert {rule['alert']} is not explained in docs/deployment.md"
    for rule in recording_rules:
        assert f"`{rule['record']}`" in doc, f"recording rule {rule['record']} is not in docs/deployment.md"


def test_documented_settings_exist(doc) -> None:
    from streamrecall.ops.cli import SETTING_OPTIONS, env_name

    known = {env_name(name) for _, name, _, _ in SETTING_OPTIONS} | {"STREAMRECALL_CONFIG"}
    mentioned = set(re.findall(r"STREAMRECALL_[A-Z_]+[A-Z]", doc))
    assert not mentioned - known, f"docs name settings the CLI does not read: {sorted(mentioned - known)}"


def test_the_project_cites_no_design_file_outside_it():
    """The design lives in docs/architecture.md; nothing in the repository points outside it."""
    import subprocess

    repo = DOC.parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    design = "DESIGN" + ".md"  # spelt apart so this file does not cite it either
    citing = [p for p in tracked if (repo / p).is_file() and design in (repo / p).read_text(errors="replace")]
    assert not citing, f"{citing} cite {design}; link docs/architecture.md instead"
    assert (repo / "docs" / "architecture.md").is_file()
