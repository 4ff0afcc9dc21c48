"""``make demo``: two real peers behind two real NATs get a direct TCP stream.

As root: builds the netns lab (a WAN, a public rendezvous host, two NAT routers
with endpoint-independent, port-preserving mapping that drop unsolicited
inbound), runs the real ``punch rendezvous`` and two real ``punch`` processes in
it, sends one line each way, and prints each peer's 4-tuple, whether the path is
direct, and the time from introduction to authenticated stream. Without root it
runs the same flow on loopback and says so. Exit status 0 when both peers got a
direct stream and each other's line.
"""

from __future__ import annotations

import sys

from netns.lab import RENDEZVOUS_PORT, Lab, Topology, build_two_nats, missing_requirements
from netns.scenario import PeerRun, run_in_lab, run_on_loopback


def _describe(run: PeerRun, expect_remote_ip: str | None, where: str, other: PeerRun) -> bool:
    connected = run.event("connected")
    if connected is None or run.returncode != 0:
        error = run.event("error")
        detail = error["error"] if error else run.stderr.strip()
        print(f"{run.name}: FAILED (exit {run.returncode}): {detail}")
        return False
    remote_ip = connected["remote"].rsplit(":", 1)[0]
    other_connected = other.event("connected") or {}
    direct = (
        remote_ip == expect_remote_ip
        if expect_remote_ip
        else connected["remote"] == other_connected.get("local")
    )
    print(
        f"{run.name:5}: {connected['local']} -> {connected['remote']}  "
        f"({connected['role']}, won by {connected['won_by']}) "
        f"in {connected['connect_time'] * 1000:.1f} ms"
    )
    verdict = "direct path" if direct else "NOT the expected direct path"
    print(f"       {verdict}: remote {connected['remote']} is {where}")
    print(f"       received: {run.received.decode(errors='replace').strip()!r}")
    return direct


def _report(alice: PeerRun, bob: PeerRun, expects: dict[str, tuple[str | None, str]]) -> int:
    ok = True
    for run, other in ((alice, bob), (bob, alice)):
        expect_ip, where = expects[run.name]
        ok = _describe(run, expect_ip, where, other) and ok
    ok = ok and alice.received == b"hello from bob\n" and bob.received == b"hello from alice\n"
    print("demo:", "OK, a direct TCP stream each way" if ok else "FAILED")
    return 0 if ok else 1


def run_lab() -> int:
    with Lab() as lab:
        topology: Topology = build_two_nats(lab)
        a, b = topology.sites
        print("punch demo in the netns lab (NAT: endpoint-independent mapping, port-preserving,")
        print("unsolicited inbound dropped):")
        print(f"  rendezvous  {topology.rendezvous_ip}:{RENDEZVOUS_PORT} on the public segment")
        print(f"  alice       {a.peer_ip} behind NAT a, public {a.public_ip}")
        print(f"  bob         {b.peer_ip} behind NAT b, public {b.public_ip}")
        print()
        alice, bob = run_in_lab(lab, topology)
        return _report(
            alice,
            bob,
            {
                "alice": (
                    b.public_ip,
                    f"NAT b's public address, not the rendezvous ({topology.rendezvous_ip})",
                ),
                "bob": (
                    a.public_ip,
                    f"NAT a's public address, not the rendezvous ({topology.rendezvous_ip})",
                ),
            },
        )


def run_loopback(reason: str) -> int:
    print(f"punch demo on LOOPBACK ONLY ({reason}): no NAT is crossed here.")
    print("Run `sudo make demo` for the real NATs of the netns lab.\n")
    alice, bob, address = run_on_loopback()
    print(f"  rendezvous  {address}\n")
    return _report(
        alice, bob, {"alice": (None, "bob's own socket"), "bob": (None, "alice's own socket")}
    )


def main() -> int:
    reason = missing_requirements()
    return run_loopback(reason) if reason else run_lab()


if __name__ == "__main__":
    sys.exit(main())
