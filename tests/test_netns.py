"""Through real NATs: network namespaces, veth, nftables, the real commands."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns.lab import RENDEZVOUS_PORT, Lab, build_two_nats, missing_requirements
from netns.scenario import PUNCH, PairRun, run_in_lab, wait_for

from punch._cli import EXIT_UNKNOWN_PEER

REASON = missing_requirements()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_two_peers_behind_two_cone_nats_get_a_direct_stream() -> None:
    with Lab() as lab:
        topology = build_two_nats(lab)
        a, b = topology.sites
        # Control: the NAT really filters. An unsolicited SYN to NAT b's public
        # address gets no answer (one attempt, 1 s), so any stream below is punched.
        probe = subprocess.run(
            [
                *lab.exec_prefix(a.peer_ns),
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('{b.public_ip}', 40000), timeout=1)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode != 0
        assert "timed out" in probe.stderr
        alice, bob = run_in_lab(lab, topology)
        prefix = lab.prefix
    assert prefix not in _namespaces()  # torn down by name

    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    registered_a, registered_b = alice.event("registered"), bob.event("registered")
    connected_a, connected_b = alice.event("connected"), bob.event("connected")
    assert registered_a
    assert registered_b
    assert connected_a
    assert connected_b
    # the rendezvous saw each peer at its NAT's public address (the NAT translated)
    assert registered_a["observed"].startswith(a.public_ip + ":")
    assert registered_b["observed"].startswith(b.public_ip + ":")
    # each peer's stream goes straight to the other NAT's public endpoint: no relay
    assert connected_a["local"].startswith(a.peer_ip + ":")
    assert connected_a["remote"] == registered_b["observed"]
    assert connected_b["remote"] == registered_a["observed"]
    assert (connected_a["role"], connected_b["role"]) == ("initiator", "responder")
    assert alice.received == b"hello from bob\n"
    assert bob.received == b"hello from alice\n"


def test_lab_is_torn_down_even_when_the_body_fails() -> None:
    lab = Lab()

    def fail_inside_the_lab() -> None:
        with lab:
            lab.ns("x")
            assert lab.prefix in _namespaces()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_the_lab()
    assert lab.prefix not in _namespaces()


def test_an_unknown_peer_is_refused_at_once_in_the_lab() -> None:
    with Lab() as lab:
        topology = build_two_nats(lab)
        pair = PairRun()
        try:
            address = pair.start_rendezvous(
                lab.exec_prefix(topology.rendezvous_ns), f"{topology.rendezvous_ip}:7000"
            )
            start = time.monotonic()
            process = pair.start_peer(
                "alice", lab.exec_prefix(topology.sites[0].peer_ns), ["connect", "nobody"], address
            )
            alice = pair.wait("alice", process, 10)
            elapsed = time.monotonic() - start
        finally:
            pair.close()
    assert alice.returncode == EXIT_UNKNOWN_PEER
    assert elapsed < 3.0  # process start-up included; no punch is attempted
    error = alice.event("error")
    assert error is not None
    assert "unknown-peer" in error["error"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_punch_send_moves_100_mib_through_two_nats(tmp_path: Path) -> None:
    source, inbox = tmp_path / "payload.bin", tmp_path / "inbox"
    inbox.mkdir()
    with source.open("wb") as file:
        for _ in range(100):
            file.write(os.urandom(1 << 20))
    with Lab() as lab:
        topology = build_two_nats(lab)
        a, b = topology.sites
        pair = PairRun()
        try:
            address = pair.start_rendezvous(
                lab.exec_prefix(topology.rendezvous_ns), f"{topology.rendezvous_ip}:7000"
            )
            bob = pair.start_peer(
                "bob", lab.exec_prefix(b.peer_ns), ["receive", "--out", str(inbox)], address
            )
            alice = pair.start_peer(
                "alice", lab.exec_prefix(a.peer_ns), ["send", str(source), "--to", "bob"], address
            )
            alice_run, bob_run = pair.wait("alice", alice, 120), pair.wait("bob", bob, 30)
        finally:
            pair.close()
    assert (alice_run.returncode, bob_run.returncode) == (0, 0), (alice_run.stderr, bob_run.stderr)
    assert _sha256(inbox / "payload.bin") == _sha256(source)
    connected, registered_b = alice_run.event("connected"), bob_run.event("registered")
    assert connected
    assert registered_b
    assert connected["remote"] == registered_b["observed"]  # direct, through NAT b
    for run in (alice_run, bob_run):
        progress = [e["done"] for e in run.events if e["event"] == "progress"]
        assert len(progress) >= 10
        assert progress == sorted(progress)
        assert progress[-1] == 100 << 20
    verified = alice_run.event("verified")
    assert verified
    assert verified["sha256"] == _sha256(source)


def _round_trip_ms(lab: Lab, ns: str, ip: str) -> float:
    """One SYN from ``ns`` to a closed port on ``ip`` and its RST back, in milliseconds."""
    code = (
        "import socket, time\n"
        "s = socket.socket(); t = time.perf_counter()\n"
        f"assert s.connect_ex(('{ip}', 9)) == 111\n"  # ECONNREFUSED: the RST came back
        "print((time.perf_counter() - t) * 1000)"
    )
    done = subprocess.run(
        [*lab.exec_prefix(ns), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return float(done.stdout)


def test_the_wan_delay_line_holds_every_packet_each_way() -> None:
    with Lab() as lab:
        topology = build_two_nats(lab)
        nat_a = topology.sites[0].nat_ns
        assert nat_a is not None
        before = _round_trip_ms(lab, nat_a, topology.rendezvous_ip)
        lab.delay(0.02)
        after = _round_trip_ms(lab, nat_a, topology.rendezvous_ip)
        prefix = lab.prefix
    assert prefix not in _namespaces()  # the delay line went with its namespace
    assert after >= 40 > before  # 20 ms there, 20 ms back; none before


def _introduced_at(run: object) -> float:
    """When this peer's introduction arrived (its ``-v`` JSON log, wall clock)."""
    events = run.events  # type: ignore[attr-defined]
    return next(e["time"] for e in events if "introduced to" in e.get("message", ""))


def test_hold_back_makes_one_introduction_late_and_nothing_else() -> None:
    """The sweep's lateness: the server sends both introductions at once; the lab
    holds the responder's back 0.3 s on the WAN router, and its punch traffic not at all."""
    with Lab() as lab:
        topology = build_two_nats(lab)
        lab.hold_back(topology.rendezvous_ns, topology.sites[1].public_ip, 0.3)
        verbose = {"listener_args": ("-v",), "connector_args": ("-v",)}
        alice, bob = run_in_lab(lab, topology, **verbose)
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    late = _introduced_at(bob) - _introduced_at(alice)
    # each time is logged as that peer handles its introduction: a few ms of either
    # peer's own work (alice's TLS contexts, built in a thread as her host opens) move it
    assert 0.3 - 0.005 <= late < 0.3 + 0.1
    connected = alice.event("connected")
    assert connected
    # alice waited for bob's late SYN; cone x cone at no link delay needs little more
    assert 0.3 - 0.05 <= connected["connect_time"] < 0.3 + 0.2


def test_a_hold_switched_on_after_registering_delays_the_introduction_only() -> None:
    """The sweep's late responder: it registers at the path's own speed (held back
    from the start, each of the rendezvous's frames to it came 0.3 s late), then the
    hold goes on and its introduction comes 0.3 s after alice's."""
    with Lab() as lab:
        topology = build_two_nats(lab)
        held = topology.rendezvous_ns, topology.sites[1].public_ip
        lab.hold_back(*held, 0.3, engaged=False)
        verbose = {"listener_args": ("-v",), "connector_args": ("-v",)}
        alice, bob = run_in_lab(
            lab, topology, after_listener=lambda: lab.engage_hold(*held), **verbose
        )
        lab.engage_hold(*held, engaged=False)
        lab.engage_hold(*held, engaged=False)  # off already: nothing to do
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    registered = bob.event("registered")
    assert registered is not None
    assert registered["elapsed"] < 0.3
    late = _introduced_at(bob) - _introduced_at(alice)
    assert 0.3 - 0.005 <= late < 0.3 + 0.1


def test_a_waiting_listener_outlives_a_rendezvous_restart() -> None:
    """The real rendezvous restarts under a waiting ``punch listen``; a ``punch connect``
    started after the restart reaches it (issue 13.12)."""
    with Lab() as lab:
        topology = build_two_nats(lab)
        a, b = topology.sites
        pair = PairRun()
        try:
            address = pair.start_lab_rendezvous(lab, topology)
            server = pair.processes[-1]
            bob = pair.start_peer("bob", lab.exec_prefix(b.peer_ns), ["listen"], address, "-v")
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
            bob_err = pair.workdir / "bob.err"
            wait_for(bob_err, lambda t: "reconnecting" in t, bob, "bob noticing")
            restarted = time.monotonic()
            listen = ["--listen", f"{topology.rendezvous_ip}:{RENDEZVOUS_PORT}"]
            pair.start(
                "rendezvous2",
                lab.exec_prefix(topology.rendezvous_ns),
                [*PUNCH, "rendezvous", *listen],
            )
            wait_for(bob_err, lambda t: "registered 'bob' again" in t, bob, "bob registering again")
            back_after = time.monotonic() - restarted
            alice = pair.start_peer(
                "alice", lab.exec_prefix(a.peer_ns), ["connect", "bob"], address
            )
            alice_run, bob_run = pair.wait("alice", alice, 30), pair.wait("bob", bob, 30)
        finally:
            pair.close()
    assert (alice_run.returncode, bob_run.returncode) == (0, 0), (alice_run.stderr, bob_run.stderr)
    assert bob_run.received == b"hello from alice\n"
    assert alice_run.received == b"hello from bob\n"
    # bob's waits were 0.25-0.5, 0.5-1, 1-2 s...: back within a few of them, not 30 s
    assert back_after < 5, back_after


def test_a_registration_does_not_wait_on_the_servers_syn_ack_backoff() -> None:
    """Every pure ACK into the rendezvous is lost: the client's first frame (an early
    Keepalive) carries the TCP handshake's last ACK, so the server accepts at once.

    Without it, a server that speaks first never sees the handshake complete: its
    SYN-ACK retransmissions (1, 2, 4 s apart) are answered by more pure ACKs."""
    rule = "ip length 52 tcp flags == ack counter drop"  # 20 + 20 + 12 (timestamps): no data
    hook = "type filter hook input priority 0"
    text = f"table ip acklost {{\n chain c {{\n  {hook};\n  {rule}\n }}\n}}\n"
    with Lab() as lab:
        topology = build_two_nats(lab)
        lab.sh(topology.rendezvous_ns, "nft", "-f", "-", stdin=text)
        pair = PairRun()
        try:
            address = pair.start_lab_rendezvous(lab, topology)
            bob = pair.start_peer(  # returns once registered, else raises
                "bob", lab.exec_prefix(topology.sites[1].peer_ns), ["listen"], address
            )
            bob.kill()
        finally:
            pair.close()
        dropped = lab.sh(topology.rendezvous_ns, "nft", "list", "table", "ip", "acklost")
    assert "counter packets 0 " not in dropped, dropped  # the rule did take ACKs away


CONNECT_PAST_SYN_RETRIES = """
import trio
from punch import Endpoint
from punch._control import connect_control

async def main() -> None:
    with trio.move_on_after(8.5):  # tcp_syn_retries (6), a second apart, end at 7 s
        try:
            await connect_control(
                Endpoint("10.99.0.1", 0), Endpoint("10.99.0.2", 7000), 10.0, None, ""
            )
        except OSError as exc:
            print("gave up:", exc)
            return
    print("still connecting")

trio.run(main)
"""


def test_a_control_connect_is_not_abandoned_by_the_kernel_before_its_timeout() -> None:
    """Every SYN is lost: the kernel keeps sending them a second apart, past the 7 s at
    which the default SYN retry count would have failed the connect with ETIMEDOUT."""
    with Lab() as lab:
        a, b = lab.ns("a"), lab.ns("b")
        lab.link(a, "v0", b, "v1")
        lab.address(a, "v0", "10.99.0.1/24")
        lab.address(b, "v1", "10.99.0.2/24")
        rule = "tcp flags syn counter drop"
        hook = "type filter hook input priority 0"
        lab.sh(
            b, "nft", "-f", "-", stdin=f"table ip l {{\n chain c {{\n  {hook};\n  {rule}\n }}\n}}\n"
        )
        out = lab.sh(a, sys.executable, "-c", CONNECT_PAST_SYN_RETRIES)
        dropped = lab.sh(b, "nft", "list", "table", "ip", "l")
    assert out.strip() == "still connecting"
    assert int(dropped.split("packets ")[1].split()[0]) >= 9  # 0, 1, ..., 8 s


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(2.0)
print("ready", flush=True)
got = 0
try:
    while True:
        data, sender = s.recvfrom(64)
        got += 1
        s.sendto(data, sender)
except TimeoutError:
    print(got)
"""

UDP_SEND = """
import socket, sys, time
count, server = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.002)
back = 0
for i in range(count):  # bounded: count datagrams, 2 ms apart at most
    s.sendto(b"%d" % i, (server, 9999))
    try:
        s.recv(64)
        back += 1
    except TimeoutError:
        pass
s.settimeout(1.0)
try:
    while True:
        s.recv(64)
        back += 1
except TimeoutError:
    print(back)
"""


def test_loss_on_both_sites_drops_the_given_share_each_way() -> None:
    """20% on each site's WAN link: 20% of what a peer sends upstream, and 20% of
    what comes back; not more because the other site is lossy too (a table shared
    by the WAN router's ports once hooked each port into both drop rules: 36% up)."""
    count = 1000
    with Lab() as lab:
        topology = build_two_nats(lab)
        for site in topology.sites:
            lab.loss(site.nat_ns, 20)
        echo = subprocess.Popen(
            [*lab.exec_prefix(topology.rendezvous_ns), sys.executable, "-c", UDP_ECHO],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert echo.stdout is not None
            assert echo.stdout.readline() == "ready\n"
            sender = lab.exec_prefix(topology.sites[0].peer_ns)
            back = subprocess.run(
                [*sender, sys.executable, "-c", UDP_SEND, str(count), topology.rendezvous_ip],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
            up = int(echo.communicate(timeout=30)[0])
        finally:
            echo.kill()
    # binomial(1000, 0.8): sd 12.6, so each band is about 5 sd wide each side
    assert 740 <= up <= 860, up
    assert 0.74 <= int(back) / up <= 0.86, (back, up)


TCP_BOTH_WAYS = """
import socket, sys, time
size = int(sys.argv[2])
def timed_receive(s):
    got, started = 0, None
    while got < size:
        data = s.recv(1 << 16)
        if not data:
            raise EOFError(got)
        started = started or time.perf_counter()
        got += len(data)
    return time.perf_counter() - started
if sys.argv[1] == "serve":
    listener = socket.create_server(("0.0.0.0", 9998))
    print("ready", flush=True)
    listener.settimeout(30)
    s, _ = listener.accept()
    print(timed_receive(s), flush=True)
    s.sendall(bytes(size))
    s.recv(1)
else:
    s = socket.create_connection((sys.argv[3], 9998), timeout=30)
    s.sendall(bytes(size))
    print(timed_receive(s), flush=True)
"""


def test_a_shaped_site_link_carries_its_rate_each_way_and_no_more() -> None:
    """``Lab.rate``: 40 Mbit/s on site a's WAN link holds a TCP transfer to that
    rate up and down (the first 256 KiB may pass as one burst)."""
    rate, size = 40_000_000, 4 << 20
    with Lab() as lab:
        topology = build_two_nats(lab)
        site = topology.sites[0]
        assert site.nat_ns is not None
        lab.rate(site.nat_ns, rate)
        script = [sys.executable, "-c", TCP_BOTH_WAYS]
        server = subprocess.Popen(
            [*lab.exec_prefix(topology.rendezvous_ns), *script, "serve", str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline() == "ready\n"
            down = subprocess.run(
                [
                    *lab.exec_prefix(site.peer_ns),
                    *script,
                    "send",
                    str(size),
                    topology.rendezvous_ip,
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            up = server.communicate(timeout=30)[0]
        finally:
            server.kill()
    least = (size - (256 << 10)) * 8 / rate  # seconds at exactly the rate, burst left out
    for seconds in (float(up), float(down)):
        assert least * 0.95 <= seconds <= least * 3, (seconds, least)
