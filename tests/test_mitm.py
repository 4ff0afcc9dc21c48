"""A rendezvous that lies (:mod:`netns.liar`), through real NATs, against the real commands.

Issue 14's man-in-the-middle: the rendezvous operator hands out keys it chose,
or introduces a third host in place of the peer. TLS with the registered key
catches the first without any pin; only a pinned peer ID catches the second.
"""

from __future__ import annotations

import sys

import pytest
from netns.lab import Lab, build_two_nats, missing_requirements
from netns.scenario import PairRun, PeerRun

from punch import Identity
from punch._cli import EXIT_HANDSHAKE

REASON = missing_requirements()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

LIAR = [sys.executable, "-m", "netns.liar"]
WAIT = 30.0
"""Seconds each peer gets to exit by itself (its punch timeout is 10 s)."""


def _lied_to(
    lie: str, *alice_args: str, listeners: tuple[str, ...] = ("bob",), awaited: tuple[str, ...] = ()
) -> dict[str, PeerRun | str]:
    """``listeners`` listen at site b, alice at site a runs ``punch connect bob``
    (``alice_args`` formatted with the peer IDs), through a rendezvous told to
    ``lie``. After alice, the ``awaited`` listeners get :data:`WAIT` seconds to
    exit by themselves; the others are killed at once. Returns each peer's run
    and each peer ID (``NAME_id``)."""
    with Lab() as lab:
        topology = build_two_nats(lab)
        a, b = topology.sites
        pair = PairRun()
        try:
            ids = {name: Identity.generate() for name in ("alice", "bob", "carol")}
            for name, identity in ids.items():
                identity.save(pair.workdir / f"{name}.pem")  # start_peer's --identity
            address = pair.start_lab_rendezvous(lab, topology, program=[*LIAR, lie])
            started = {
                name: pair.start_peer(name, lab.exec_prefix(b.peer_ns), ["listen"], address)
                for name in listeners
            }
            args = [arg.format(**{n: i.peer_id for n, i in ids.items()}) for arg in alice_args]
            alice = pair.start_peer(
                "alice", lab.exec_prefix(a.peer_ns), ["connect", "bob"], address, *args
            )
            runs: dict[str, PeerRun | str] = {"alice": pair.wait("alice", alice, WAIT)}
            for name, process in started.items():
                runs[name] = pair.wait(name, process, WAIT if name in awaited else 0)
        finally:
            pair.close()
    runs.update({f"{name}_id": identity.peer_id for name, identity in ids.items()})
    return runs


def _error(run: PeerRun | str) -> str:
    assert isinstance(run, PeerRun)
    event = run.event("error")
    assert event is not None, run.stderr
    return str(event["error"])


def test_swapped_keys_are_refused_by_tls_on_both_sides_without_any_pin() -> None:
    runs = _lied_to("swap-keys", awaited=("bob",))
    alice, bob = runs["alice"], runs["bob"]
    assert isinstance(alice, PeerRun)
    assert isinstance(bob, PeerRun)
    assert (alice.returncode, bob.returncode) == (EXIT_HANDSHAKE, EXIT_HANDSHAKE), (
        alice.stderr,
        bob.stderr,
    )
    # each was told its own key was the peer's; the peer presented its real one
    for run in (alice, bob):
        assert "peer verification failed" in _error(run)
        assert run.event("connected") is None
        assert run.received == b""


def test_a_third_host_in_place_of_the_peer_is_caught_only_by_a_pin() -> None:
    # unpinned, alice cannot tell: she gets a TLS stream that carol's key proves
    runs = _lied_to("bob=carol", listeners=("bob", "carol"), awaited=("carol",))
    alice, carol = runs["alice"], runs["carol"]
    assert isinstance(alice, PeerRun)
    assert isinstance(carol, PeerRun)
    assert (alice.returncode, carol.returncode) == (0, 0), (alice.stderr, carol.stderr)
    connected = alice.event("connected")
    assert connected is not None
    assert (connected["peer"], connected["peer_id"]) == ("bob", runs["carol_id"])
    assert alice.received == b"hello from carol\n"
    # pinned to bob's peer ID, alice refuses the introduction before any SYN
    runs = _lied_to("bob=carol", "--peer-id", "{bob}", listeners=("bob", "carol"))
    alice = runs["alice"]
    assert isinstance(alice, PeerRun)
    assert alice.returncode == EXIT_HANDSHAKE, alice.stderr
    error = _error(alice)
    assert f"peer ID {runs['carol_id']}, not the pinned {runs['bob_id']}" in error
    event = alice.event("error")
    assert event is not None
    assert event["attempts"] == []  # no candidate was tried
    assert alice.received == b""
