"""``punch natcheck`` through the lab's NATs: the real rendezvous and command."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from netns.lab import RENDEZVOUS_PORT, Lab, build_two_nats, missing_requirements
from netns.scenario import PUNCH, PairRun

REASON = missing_requirements()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def natcheck_in_lab(profile: str, *args: str) -> tuple[dict[str, Any], str]:
    """``punch natcheck --json`` and the plain report, from a peer behind ``profile``."""
    with Lab() as lab:
        topology = build_two_nats(lab, profile, "cone")
        site = topology.sites[0]
        pair = PairRun()
        try:
            pair.start_lab_rendezvous(lab, topology)
            command = [
                *lab.exec_prefix(site.peer_ns),
                *PUNCH,
                "natcheck",
                "--rendezvous",
                f"{topology.rendezvous_ip}:{RENDEZVOUS_PORT}",
                *args,
            ]
            runs = [
                subprocess.run(c, capture_output=True, text=True, timeout=60)
                for c in ([*command, "--json"], command)
            ]
        finally:
            pair.close()
    for run in runs:
        assert run.returncode == 0, run.stderr
    report = json.loads(runs[0].stdout)
    assert report["local"].startswith(site.peer_ip + ":")
    assert report["observed"].startswith(site.public_ip + ":")
    assert report["behind_nat"] is True
    return report, runs[1].stdout


def test_a_cone_nat_maps_independently_preserves_ports_and_filters_by_port() -> None:
    report, text = natcheck_in_lab("cone")
    assert report["mapping"] == "endpoint-independent"
    assert report["observed_probe"] == report["observed"]
    assert report["port_preserving"] is True
    assert report["allocation"] == "preserving"
    assert report["ports"] == report["local_ports"]
    assert len(report["ports"]) == 8
    # the probe port's SYN to a mapping made for the control port only: dropped
    assert report["filtering"] == "address-and-port-dependent"
    assert report["filtering_outcome"] == "timed out"
    assert "mapping:           endpoint-independent" in text
    assert "a cone NAT" in text


def test_an_rst_answering_cone_nat_refuses_the_filtering_probe() -> None:
    report, _ = natcheck_in_lab("cone-rst", "--probes", "3")
    assert report["mapping"] == "endpoint-independent"
    assert (report["filtering"], report["filtering_outcome"]) == (
        "address-and-port-dependent",
        "refused",
    )


def test_a_symmetric_nat_with_random_ports_is_told_apart() -> None:
    report, text = natcheck_in_lab("symmetric")
    assert report["mapping"] == "endpoint-dependent"
    assert report["observed_probe"] != report["observed"]
    assert report["port_preserving"] is False
    assert report["allocation"] == "random"
    assert report["step"] is None
    assert "random ports" in text


def test_a_symmetric_nat_with_sequential_ports_shows_its_step() -> None:
    report, text = natcheck_in_lab("symmetric-seq", "--probes", "10")
    assert report["mapping"] == "endpoint-dependent"
    assert report["port_preserving"] is False
    assert report["allocation"] == "sequential"
    assert report["step"] == 1
    ports = report["ports"]
    assert ports == list(range(ports[0], ports[0] + 10))  # no other traffic in this lab
    assert "sequential (step +1)" in text
