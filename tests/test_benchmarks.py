"""The benchmark suite works end to end (``--quick``: few trials, small sizes, as root).

Figures are printed by ``make bench``, never asserted here; this checks that
every measurement ran, that every punch connected, and that the pacing bound
held, so the suite cannot rot between full runs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.peer import AttemptCounter
from netns.lab import missing_requirements

REASON = missing_requirements()


def test_attempt_counter_finds_the_busiest_second() -> None:
    counter = AttemptCounter()
    counter.starts["srflx 203.0.113.12:4000"] = [0.0, 0.1, 0.2, 1.5, 1.6, 2.55]
    counter.starts["host 10.0.2.2:4000"] = [0.0, 0.5]
    assert counter.take_peak() == 3
    assert counter.take_peak() == 0  # taken: forgotten


def test_attempt_counter_counts_starts_not_outcomes() -> None:
    counter = AttemptCounter()
    for fields in (
        {"candidate": "srflx 203.0.113.12:4000", "attempt": 1},
        {"candidate": "srflx 203.0.113.12:4000", "attempt": 1, "outcome": "refused"},
        {"candidate": "srflx 203.0.113.12:4000", "attempt": 2},
    ):
        record = logging.LogRecord("punch.race", logging.DEBUG, __file__, 1, "attempt", (), None)
        record.fields = fields
        counter.emit(record)
    assert len(counter.starts["srflx 203.0.113.12:4000"]) == 2


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_quick_benchmark_run_measures_everything(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| time to authenticated stream" in done.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["time_to_stream"]["ratio"] > 0
    assert summary["time_to_stream"]["connected"] == summary["time_to_stream"]["trials"] == 5
    assert summary["worst_timing"]["trials"] == 3  # cone-rst x cone-rst: not every one connects
    assert summary["worst_timing"]["attempts_per_s_max"] <= 20
    assert all(summary["throughput"][d]["ratio"] > 0 for d in ("up", "down"))
    assert [p["peers"] for p in summary["capacity"]["points"]] == [1_000, 2_000]
    assert summary["capacity"]["introductions_per_s"] > 0
    assert summary["cpu_per_punch"] > 0
