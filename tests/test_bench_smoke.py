"""The benchmark (tests/bench/run.py) runs end to end in smoke mode and reports every scenario.

Smoke mode is a second per scenario with tiny sizes, so the benchmark cannot rot; no speed
is asserted here (the targets are checked by a full run, by people).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_service

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "bench" / "run.py"

HEADINGS = [
    "## GET /get",
    "## GET /set, 16 connections, with fsync",
    "## GET /set, 16 connections, with --no-fsync",
    "## REST PUT and GET",
    "## Event streams",
    "Write to event",
    "## Start-up and RSS",
    "## One 16 MiB value",
    "## Targets",
]
SCENARIOS = ["| 1 conn ", "| 16 conn ", "| 64 conn ", "| 16 conn, fsync ", "| 16 conn, --no-fsync "]
SCENARIOS += ["| PUT 4 KiB ", "| GET 4 KiB ", "| PUT 1 MiB ", "| GET 1 MiB "]
SERVERS = ["kvserver", "ceiling", "flask+waitress", "naive", "bare fsync loop", "cp + sync", "kvserver GET"]
SERVERS += ["kvserver, 100 streams"]
# Both write tables measure the system calls kvserver makes without HTTP, as a reference.
ROWS = ["| 16 conn, fsync | kvserver's system calls", "| 16 conn, --no-fsync | kvserver's system calls"]
TARGETS = ["1.0× the ceiling", "CPU per request", "4× flask+waitress", "p99 ≤ 2× the ceiling's", "p50 < 0.2 ms"]
TARGETS += ["bare fsync loop", "the ceiling", "before the write-path work", "start-up"]
TARGETS += ["RSS with", "RSS grows", "PUT: ≥ 0.5× cp + sync", "GET: ≥ 0.5× cp", "100 open streams"]


@pytest.mark.timeout(180)
def test_smoke_run_reports_every_scenario() -> None:
    if shutil.which("wrk") is None:
        require_service("wrk, the load generator of the benchmark (apt-get install wrk)")
    done = subprocess.run(
        [sys.executable, str(RUN), "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    report = done.stdout
    assert done.returncode == 0, f"run.py --smoke exited {done.returncode}:\n{report}\n{done.stderr[-3000:]}"
    for text in HEADINGS + SCENARIOS + SERVERS + ROWS:
        assert text in report, f"{text!r} is missing from the report:\n{report}"
    targets = report.split("## Targets", 1)[1]
    for text in TARGETS:
        assert text in targets, f"target {text!r} is missing:\n{targets}"
    verdicts = re.findall(r"\| (?:PASS|FAIL|n/a) +\|$", targets, re.MULTILINE)
    assert len(verdicts) == 15, f"the benchmark has 15 targets, the report judges {len(verdicts)}:\n{targets}"
    assert "Load average at start" in report and "Load average at end" in report
    assert not list(RUN.parent.glob(".work-*")), "run.py left its work dir behind"
