"""The benchmarks that run in the netns lab: time to stream, NAT timing, cold start, throughput.

Each builds its own :class:`netns.lab.Lab` (deleted on exit, pass or fail)
and runs :mod:`benchmarks.peer` or the real ``punch`` command in it. Traffic
stays inside the lab's namespaces.
"""

from __future__ import annotations

import json
import secrets
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netns.lab import RENDEZVOUS_PORT, Lab, Topology, build_two_nats
from netns.scenario import PUNCH, PairRun, wait_for

from benchmarks.capacity import RELAY_UNLIMITED
from punch._race import DEFAULT_STAGGER

PEER = [sys.executable, "-m", "benchmarks.peer"]
DIRECT_PORT = 7100
RAW_PORT = 7200
TLS_PORT = 7300
PHASE_TIMEOUT = 300.0
"""Seconds alice gets for all her phases before she is killed (bounds every run)."""
FIRST_BYTE_TIMEOUT = 20.0


def _lab_pair(
    profile: str,
    *,
    trials: int,
    rounds: int = 0,
    count: int = 0,
    skew: float = 0.0,
    delay: float = 0.0,
    rate: int = 0,
    flows: str | None = None,
) -> dict[str, Any]:
    """Bob at site b (with port forwards for the baselines), alice at site a; alice's report.

    ``delay``: seconds one way on the WAN (a round trip between the sites is twice it).
    ``rate``: bit/s of each site's WAN link (:meth:`Lab.rate`), 0 for the bare veth.
    ``flows``: alice's ``--flows`` (default: all of them).
    """
    with Lab() as lab:
        topology = build_two_nats(lab, profile, profile)
        a, b = topology.sites
        assert b.nat_ns is not None
        for port in (DIRECT_PORT, RAW_PORT, TLS_PORT):
            lab.forward(b.nat_ns, port, b.peer_ip)
        if delay:
            lab.delay(delay)
        for site in topology.sites if rate else ():
            assert site.nat_ns is not None
            lab.rate(site.nat_ns, rate)
        if skew:  # the responder's introductions come late, as over a slower path
            lab.hold_back(topology.rendezvous_ns, b.public_ip, skew)
        pair = PairRun()
        try:
            address = pair.start_lab_rendezvous(
                lab,
                topology,
                "--introductions-per-minute",
                "100000",
                "--quiet",
                *RELAY_UNLIMITED,
            )
            common = ["--rendezvous", address, "--trials", str(trials)]
            common += ["--secret", secrets.token_hex(32)]
            bob = pair.start("bob", lab.exec_prefix(b.peer_ns), [*PEER, "bob", *common])
            wait_for(pair.workdir / "bob.out", lambda t: "ready" in t, bob, "benchmark bob")
            extra = [f"--direct={b.public_ip}:{DIRECT_PORT}", f"--raw={b.public_ip}:{RAW_PORT}"]
            extra += [f"--tls={b.public_ip}:{TLS_PORT}"]
            if rounds:
                extra += ["--rounds", str(rounds), "--bytes", str(count)]
            if flows is not None:
                extra += ["--flows", flows]
            alice = pair.start(
                "alice", lab.exec_prefix(a.peer_ns), [*PEER, "alice", *common, *extra]
            )
            run = pair.wait("alice", alice, PHASE_TIMEOUT)
        finally:
            pair.close()
    if run.returncode != 0:
        raise RuntimeError(f"benchmark alice exited {run.returncode}: {run.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(run.received)
    return report


def time_to_stream(trials: int, rounds: int, count: int) -> dict[str, Any]:
    """cone x cone: punches and direct baselines, CPU per punch, and the throughput rounds."""
    return _lab_pair("cone", trials=trials, rounds=rounds, count=count)


def shaped_throughput(rate: int, rounds: int, count: int, flows: tuple[str, ...]) -> dict[str, Any]:
    """cone x cone, each site's WAN link shaped to ``rate`` bit/s: these throughput
    flows only (issue 17's "relayed against direct on the lab's links")."""
    return _lab_pair("cone", trials=0, rounds=rounds, count=count, rate=rate, flows=",".join(flows))


def round_trips(trials: int, round_trip: float) -> dict[str, Any]:
    """cone x cone with ``round_trip`` seconds between the sites: punches and direct baselines."""
    return _lab_pair("cone", trials=trials, delay=round_trip / 2)


def worst_timing(trials: int, skew: float) -> dict[str, Any]:
    """cone-rst x cone-rst, the responder's introduction held back ``skew`` seconds."""
    return _lab_pair("cone-rst", trials=trials, skew=skew)


def _first_byte(lab: Lab, topology: Topology, address: str, trial: int, workdir: Path) -> float:
    """Seconds from starting ``punch connect`` to its first byte of the peer's data."""
    a, b = topology.sites
    pair = PairRun(workdir=workdir)
    try:
        name = f"bob{trial}"
        pair.start_peer(name, lab.exec_prefix(b.peer_ns), ["listen"], address)
        argv = [*lab.exec_prefix(a.peer_ns), *PUNCH, "connect", name, "--rendezvous", address]
        started = time.perf_counter()
        alice = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        pair.processes.append(alice)
        assert alice.stdout is not None
        ready, _, _ = select.select([alice.stdout], [], [], FIRST_BYTE_TIMEOUT)
        if not ready or not alice.stdout.read(1):
            raise RuntimeError(f"cold start {trial}: no byte within {FIRST_BYTE_TIMEOUT:g} s")
        return time.perf_counter() - started
    finally:
        pair.close()


def cold_start(trials: int) -> dict[str, Any]:
    """``punch connect`` from process start to first byte, cone x cone; and import time."""
    with Lab() as lab:
        topology = build_two_nats(lab, "cone", "cone")
        server = PairRun()
        try:
            address = server.start_lab_rendezvous(lab, topology, "--quiet")
            seconds = [
                _first_byte(lab, topology, address, trial, server.workdir)
                for trial in range(trials)
            ]
        finally:
            server.close()
    return {"first_byte": seconds, **import_time(trials)}


def import_time(trials: int) -> dict[str, list[float]]:
    """Wall seconds of ``python -c 'import punch._cli'`` and of a bare interpreter start."""

    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        return time.perf_counter() - started

    return {
        "interpreter": [run("pass") for _ in range(trials)],
        "import": [run("import punch._cli") for _ in range(trials)],
    }


FAMILY_MODES = {
    "ipv6": ("-6",),
    "ipv4": ("-4",),
    "ipv6_black_holed": (),
}
"""The family runs, interleaved trial by trial in one lab: each family forced, and
both peers dual-stack with every IPv6 packet between the sites dropped (IPv6 is
dialled first, never answers, and IPv4 starts after the stagger)."""


def families(trials: int) -> dict[str, list[float]]:
    """cone+fw6-drop x cone+fw6-drop, 10 ms round trips: the initiator's seconds from
    introduction to nominated stream, per mode of :data:`FAMILY_MODES`, same lab run."""
    times: dict[str, list[float]] = {mode: [] for mode in FAMILY_MODES}
    with Lab() as lab:
        topology = build_two_nats(lab, "cone+fw6-drop", "cone+fw6-drop")
        a, b = topology.sites
        assert a.nat_ns is not None
        assert b.nat_ns is not None
        assert a.peer_ip6 is not None
        assert b.peer_ip6 is not None
        lab.delay(0.005)
        pair = PairRun()
        try:
            v6 = f"[{topology.rendezvous_ip6}]:{RENDEZVOUS_PORT}"
            v4 = pair.start_lab_rendezvous(lab, topology, "--listen", v6, "--quiet")
            v4 = v4.splitlines()[0]
            for trial in range(trials):
                for mode, flags in FAMILY_MODES.items():
                    black_hole = mode == "ipv6_black_holed"
                    if black_hole:
                        lab.block(a.nat_ns, f"{b.peer_ip6}/64")
                        lab.block(b.nat_ns, f"{a.peer_ip6}/64")
                    try:
                        address = v6 if "-6" in flags else v4
                        bob, alice = f"bob{trial}{mode}", f"alice{trial}{mode}"
                        listen = pair.start_peer(
                            bob, lab.exec_prefix(b.peer_ns), ["listen"], address, *flags
                        )
                        connect = pair.start_peer(
                            alice, lab.exec_prefix(a.peer_ns), ["connect", bob], address, *flags
                        )
                        run = pair.wait(alice, connect, 30)
                        pair.wait(bob, listen, 30)
                    finally:
                        if black_hole:
                            lab.unblock(a.nat_ns, "ip6")
                            lab.unblock(b.nat_ns, "ip6")
                    connected = run.event("connected")
                    if connected is None:
                        raise RuntimeError(f"{mode} trial {trial}: {run.stderr[-2000:]}")
                    times[mode].append(connected["connect_time"])
        finally:
            pair.close()
    return times


def families_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians, the IPv6/IPv4 ratio (target <= 1.05), and the black-holed runs against
    stagger + IPv4 (target <= 1)."""
    median = {mode: statistics.median(samples) for mode, samples in times.items()}
    limit = DEFAULT_STAGGER + median["ipv4"]
    return {
        **{f"{mode}_median": value for mode, value in median.items()},
        "ratio": median["ipv6"] / median["ipv4"],
        "target": 1.05,
        "stagger": DEFAULT_STAGGER,
        "black_holed_limit": limit,
        "black_holed_ratio": median["ipv6_black_holed"] / limit,
        "trials": len(times["ipv4"]),
    }
