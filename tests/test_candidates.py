"""Which candidates a race dials: pure selection, tested with values alone."""

from __future__ import annotations

import pytest

from punch import Candidate, CandidateType, Endpoint, SelfDialError
from punch._candidates import MAX_DIALED_CANDIDATES, select_candidates

LOCAL = Endpoint("0.0.0.0", 4000)
OURS = Endpoint("203.0.113.11", 4000)


def srflx(ip: str, port: int = 5000) -> Candidate:
    return Candidate(CandidateType.SERVER_REFLEXIVE, Endpoint(ip, port))


def host(ip: str, port: int = 5000) -> Candidate:
    return Candidate(CandidateType.HOST, Endpoint(ip, port))


def test_order_is_kept_and_each_endpoint_dialled_once() -> None:
    peer = [srflx("203.0.113.12"), host("10.0.2.2"), host("203.0.113.12")]
    chosen = select_candidates(peer, LOCAL, (OURS,), "bob")
    assert chosen.dial == (peer[0], peer[1])
    assert [(s.candidate, s.reason) for s in chosen.skipped] == [
        (peer[2], "same endpoint as an earlier candidate")
    ]


def test_other_families_and_our_own_endpoints_are_skipped() -> None:
    peer = [host("2001:db8::2"), srflx(OURS.ip, OURS.port), srflx("203.0.113.12")]
    chosen = select_candidates(peer, LOCAL, (OURS,), "bob")
    assert chosen.dial == (peer[2],)
    reasons = {s.candidate: s.reason for s in chosen.skipped}
    assert reasons[peer[0]] == "not AF_INET like our port"
    assert "our own endpoint" in reasons[peer[1]]


def test_only_our_own_endpoints_is_a_self_dial_error() -> None:
    with pytest.raises(SelfDialError, match="every candidate of 'bob' is our own endpoint"):
        select_candidates([srflx(OURS.ip, OURS.port)], LOCAL, (OURS,), "bob")


def test_nothing_offered_is_nothing_to_dial_not_an_error() -> None:
    assert select_candidates([], LOCAL, (), "bob").dial == ()


def test_at_most_eight_are_dialled_in_the_order_given() -> None:
    peer = [host(f"10.0.2.{i}") for i in range(1, 11)]
    chosen = select_candidates(peer, LOCAL, (), "bob")
    assert chosen.dial == tuple(peer[:MAX_DIALED_CANDIDATES])
    assert [s.candidate for s in chosen.skipped] == peer[MAX_DIALED_CANDIDATES:]
