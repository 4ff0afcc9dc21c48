"""The benchmark suite works end to end (``--quick``: few trials, small sizes, as root).

Figures are printed by ``make bench``, never asserted here; this checks that
every measurement ran, that every punch connected, and that the pacing bound
held, so the suite cannot rot between full runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from netns.lab import missing_requirements

REASON = missing_requirements()


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
    assert "| time to encrypted stream" in done.stdout
    assert "| TLS 1.3 after that punch" in done.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["time_to_stream"]["ratio"] > 0
    assert summary["time_to_stream"]["connected"] == summary["time_to_stream"]["trials"] == 5
    assert summary["worst_timing"]["trials"] == 3  # cone-rst x cone-rst: not every one connects
    assert summary["worst_timing"]["attempts_per_s_max"] <= 20
    flows = ("punched", "sslstream", "plain", "raw", "relayed")
    assert all(summary["throughput"][d][f] > 0 for d in ("up", "down") for f in flows)
    assert [p["peers"] for p in summary["capacity"]["points"]] == [1_000, 2_000]
    assert summary["relay_memory"]["circuits"] == 50
    assert summary["relay_memory"]["full_per_circuit"] > 0
    assert "| relay: memory per relayed stream" in done.stdout
    assert "| throughput alice to bob, relayed" in done.stdout
    shaped = summary["shaped_throughput"]  # issue 17: relayed against punched at 1 Gbit/s
    assert all(shaped[d][f] > 0 for d in ("up", "down") for f in ("punched", "relayed"))
    assert "| throughput bob to alice, relayed, TLS 1.3, each site's link shaped" in done.stdout
    assert summary["capacity"]["introductions_per_s"] > 0
    scale_out = summary["cluster"]  # issue 18: workers sharing a registry in Redis
    assert [f["workers"] for f in scale_out["introductions"]] == [1, 2, 4]
    assert len(scale_out["speedups"]) == 1
    assert scale_out["speedups"][0] > 0
    assert all(f["per_second"] > 0 for f in scale_out["introductions"])
    assert all(f["errors_per_second"] == 0 for f in scale_out["introductions"])
    assert scale_out["skew"]["across"]["attempts"] == 30
    assert 0 <= scale_out["skew"]["across"]["median"] < 1.0
    assert [m["workers"] for m in scale_out["memory"]] == [1, 2]
    assert "| rendezvous --redis: introductions/s, 2 workers" in done.stdout
    assert "| skew between an attempt's two introductions" in done.stdout
    assert summary["cpu_per_punch"] > 0
    families = summary["families"]  # every IPv6, IPv4 and black-holed run connected
    assert families["trials"] == 3
    assert families["ipv6_median"] > 0
    assert families["ipv6_black_holed_median"] > families["stagger"]  # IPv4 waited for it
    assert "| IPv6 vs IPv4" in done.stdout
    for row in summary["round_trips"]:  # 10 and 50 ms between the sites
        assert row["connected"] == row["trials"] == 3
        assert row["initiator"] > row["round_trip"]  # at least TCP's own round trip
        assert row["initiator_tls"] > row["round_trip"] / 2  # TLS has a flight each way
