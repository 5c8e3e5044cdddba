"""The fault-injection suite: `pytest tests/faults -q` (reduced size), or with
STREAMRECALL_FAULTS_SCALE=full for the full size. Prints the results table at the end;
STREAMRECALL_FAULTS_RESULTS=FILE.json also writes it as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import faultkit  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not faultkit.RESULTS:
        return
    terminalreporter.section(f"fault injection results ({faultkit.scale().name} size)")
    terminalreporter.write_line(faultkit.results_markdown())
    out = os.environ.get("STREAMRECALL_FAULTS_RESULTS")
    if out:
        Path(out).write_text(json.dumps(faultkit.RESULTS, indent=2))
        terminalreporter.write_line(f"written to {out}")
