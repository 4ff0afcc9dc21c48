"""Which candidates a race dials: pure selection, tested with values alone."""

from __future__ import annotations

import ipaddress
import socket
from types import SimpleNamespace

import pytest

from punch import Candidate, CandidateType, Endpoint, SelfDialError, _candidates
from punch._candidates import MAX_DIALED_CANDIDATES, select_candidates

LOCAL = Endpoint("0.0.0.0", 4000)
OURS = Endpoint("203.0.113.11", 4000)


def srflx(ip: str, port: int = 5000) -> Candidate:
    return Candidate(CandidateType.SERVER_REFLEXIVE, Endpoint(ip, port))


def host(ip: str, port: int = 5000) -> Candidate:
    return Candidate(CandidateType.HOST, Endpoint(ip, port))


def test_order_is_kept_and_each_endpoint_dialled_once() -> None:
    peer = [srflx("203.0.113.12"), host("10.0.2.2"), host("203.0.113.12")]
    chosen = select_candidates(peer, (LOCAL,), (OURS,), "bob")
    assert chosen.dial == (peer[0], peer[1])
    assert [(s.candidate, s.reason) for s in chosen.skipped] == [
        (peer[2], "same endpoint as an earlier candidate")
    ]


def test_other_families_and_our_own_endpoints_are_skipped() -> None:
    peer = [host("2001:db8::2"), srflx(OURS.ip, OURS.port), srflx("203.0.113.12")]
    chosen = select_candidates(peer, (LOCAL,), (OURS,), "bob")
    assert chosen.dial == (peer[2],)
    reasons = {s.candidate: s.reason for s in chosen.skipped}
    assert reasons[peer[0]] == "not AF_INET like our port"
    assert "our own endpoint" in reasons[peer[1]]


def test_only_our_own_endpoints_is_a_self_dial_error() -> None:
    with pytest.raises(SelfDialError, match="every candidate of 'bob' is our own endpoint"):
        select_candidates([srflx(OURS.ip, OURS.port)], (LOCAL,), (OURS,), "bob")


def test_nothing_offered_is_nothing_to_dial_not_an_error() -> None:
    assert select_candidates([], (LOCAL,), (), "bob").dial == ()


def test_at_most_eight_are_dialled_in_the_order_given() -> None:
    peer = [host(f"10.0.2.{i}") for i in range(1, 11)]
    chosen = select_candidates(peer, (LOCAL,), (), "bob")
    assert chosen.dial == tuple(peer[:MAX_DIALED_CANDIDATES])
    assert [s.candidate for s in chosen.skipped] == peer[MAX_DIALED_CANDIDATES:]


LOCAL6 = Endpoint("::", 4000)
OURS6 = Endpoint("2001:db8:1::2", 4000)


def test_a_dual_stack_host_dials_both_families_ipv6_first() -> None:
    peer = [srflx("203.0.113.12"), host("10.0.2.2"), host("2001:db8:2::2")]
    chosen = select_candidates(peer, (LOCAL, LOCAL6), (OURS, OURS6), "bob")
    assert chosen.dial == (peer[2], peer[0], peer[1])  # RFC 6724's default policy
    assert chosen.skipped == ()


def test_an_ipv6_only_host_skips_ipv4_candidates_saying_why() -> None:
    peer = [srflx("203.0.113.12"), host("2001:db8:2::2")]
    chosen = select_candidates(peer, (LOCAL6,), (OURS6,), "bob")
    assert chosen.dial == (peer[1],)
    assert [(s.candidate, s.reason) for s in chosen.skipped] == [
        (peer[0], "not AF_INET6 like our port")
    ]


def test_a_unique_local_candidate_is_dialled_only_from_its_own_48() -> None:
    same_site, other_site = host("fd00:1:2:3::9"), host("fd99::9")
    ours = Endpoint("fd00:1:2:4::2", 4000)  # another /64 of the same /48
    chosen = select_candidates([same_site, other_site], (LOCAL6,), (ours,), "bob")
    assert chosen.dial == (same_site,)
    assert [(s.candidate, s.reason) for s in chosen.skipped] == [
        (other_site, "unique local address outside our /48s")
    ]


@pytest.mark.parametrize(
    "remote",
    [
        Endpoint("2001:db8:1::2", 4000),  # our own global address
        Endpoint("::1", 4000),  # loopback on our port
        Endpoint("::", 4000),
        Endpoint("::ffff:127.0.0.1", 4000),  # IPv4-mapped: it is 127.0.0.1
    ],
)
def test_our_own_ipv6_and_mapped_endpoints_are_self_dials(remote: Endpoint) -> None:
    candidate = host(remote.ip, remote.port)
    with pytest.raises(SelfDialError):
        select_candidates([candidate], (LOCAL, LOCAL6), (OURS, OURS6), "bob")


@pytest.mark.parametrize(
    ("address", "offered"),
    [
        ("2001:db8:1::2", True),
        ("fd00::2", True),
        ("192.0.2.7", True),
        ("fe80::1", False),  # link-local: needs a zone
        ("169.254.1.1", False),
        ("::1", False),
        ("127.0.0.1", False),
        ("fec0::1", False),  # deprecated site-local
        ("ff02::1", False),
    ],
)
def test_interface_addresses_offers_what_peers_could_reach(
    monkeypatch: pytest.MonkeyPatch, address: str, offered: bool
) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    entry = SimpleNamespace(family=family, address=address)
    monkeypatch.setattr(_candidates.psutil, "net_if_addrs", lambda: {"eth0": [entry]})
    monkeypatch.setattr(
        _candidates.psutil, "net_if_stats", lambda: {"eth0": SimpleNamespace(isup=True)}
    )
    found = _candidates.interface_addresses(family)
    assert found == ((ipaddress.ip_address(address),) if offered else ())


def test_interface_addresses_skips_down_interfaces_and_puts_global_before_ula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def entry(address: str) -> SimpleNamespace:
        return SimpleNamespace(family=socket.AF_INET6, address=address)

    listed = {
        "eth0": [entry("fd00::2"), entry("fe80::2%eth0"), entry("2001:db8:1::2")],
        "eth1": [entry("2001:db8:9::9")],
    }
    stats = {"eth0": SimpleNamespace(isup=True), "eth1": SimpleNamespace(isup=False)}
    monkeypatch.setattr(_candidates.psutil, "net_if_addrs", lambda: listed)
    monkeypatch.setattr(_candidates.psutil, "net_if_stats", lambda: stats)
    found = _candidates.interface_addresses(socket.AF_INET6)
    assert found == (ipaddress.ip_address("2001:db8:1::2"), ipaddress.ip_address("fd00::2"))
