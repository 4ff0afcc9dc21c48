"""Birthday punching (issue 16 part 3): who probes, how fast, and that every probe ends."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from punch import Endpoint, PunchFailed
from punch._birthday import (
    MAX_SYNS_PER_SECOND,
    PORTS,
    PROBE_LIFETIME,
    Side,
    failure_hint,
    no_direct_path,
    scan_ports,
    side,
)
from punch._endpoint import Candidate, CandidateType
from punch._nat import Allocation, Mapping, NatFacts
from punch._outcome import Outcome, max_attempts_per_second, peak_rate
from punch._protocol import Introduction
from punch._race import NO_PATH_TIMEOUT, PunchOptions
from punch.reuse import _DROP_ALL, _attach_filter, bind_reusable
from tests.helpers import introductions, open_fds, play_peer, race_side, run_race
from tests.test_race import dialling_race

CONE = NatFacts(Mapping.ENDPOINT_INDEPENDENT, True, Allocation.PRESERVING, 0, (40000,))
RANDOM = NatFacts(Mapping.ENDPOINT_DEPENDENT, False, Allocation.RANDOM, None, (23001, 51234))
SEQUENTIAL = NatFacts(Mapping.ENDPOINT_DEPENDENT, False, Allocation.SEQUENTIAL, 1, (30001, 30002))
SRFLX = Endpoint("203.0.113.11", 23001)
HOST = Endpoint("10.0.1.2", 40000)
LOCAL = Endpoint("10.0.2.2", 40000)


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [
        (RANDOM, CONE, Side.SPRAY),
        (RANDOM, None, Side.SPRAY),  # a peer that reported nothing scans if it can
        (CONE, RANDOM, Side.SCAN),
        (None, RANDOM, None),  # no NAT (or not measured): its probes reach our listener
        (CONE, CONE, None),
        (SEQUENTIAL, CONE, None),  # the cone side predicts its ports instead
        (CONE, SEQUENTIAL, None),
        (RANDOM, RANDOM, None),  # no direct path
        (RANDOM, SEQUENTIAL, None),
        (None, None, None),
    ],
)
def test_the_side_follows_from_both_nats(
    own: NatFacts | None, peer: NatFacts | None, expected: Side | None
) -> None:
    assert side(own, peer) is expected


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [
        (RANDOM, RANDOM, True),
        (RANDOM, SEQUENTIAL, True),
        (SEQUENTIAL, RANDOM, True),
        (SEQUENTIAL, SEQUENTIAL, False),  # each may predict the other: measured, 2/5
        (RANDOM, CONE, False),
        (RANDOM, None, False),
    ],
)
def test_no_direct_path_through_two_endpoint_dependent_nats_one_random(
    own: NatFacts | None, peer: NatFacts | None, expected: bool
) -> None:
    assert no_direct_path(own, peer) is expected


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [
        (
            RANDOM,
            CONE,
            "our NAT maps each destination to a new port (endpoint-dependent "
            "mapping, random ports, as 'punch natcheck' shows): the two sides probed for a "
            "matching pair of ports (birthday punching) and found none in time",
        ),
        (CONE, RANDOM, "bob's NAT maps each destination to a new port"),
        (
            CONE,
            SEQUENTIAL,
            "sequential ports, as 'punch natcheck' shows): the other side "
            "dialled its predicted next ports, and none was the one it took",
        ),
        (
            RANDOM,
            SEQUENTIAL,
            "both NATs map each destination to a new port (endpoint-dependent "
            "mapping: ours with random ports, bob's with sequential ports, as 'punch natcheck' "
            "shows): "
            "no direct path exists between them; a relay is needed",
        ),
    ],
)
def test_a_failed_punch_s_hint_names_the_nat_that_maps_per_destination(
    own: NatFacts, peer: NatFacts, expected: str
) -> None:
    hint = failure_hint(own, peer, "bob")
    assert hint is not None
    assert expected in hint


@pytest.mark.parametrize(("own", "peer"), [(CONE, CONE), (None, CONE), (None, None)])
def test_no_hint_where_the_nats_allow_a_punch(own: NatFacts | None, peer: NatFacts | None) -> None:
    assert failure_hint(own, peer, "bob") is None


def test_a_scan_draws_each_port_once_from_the_dynamic_and_registered_range() -> None:
    ports = list(scan_ports(random.Random(1), frozenset({23001})))
    assert len(ports) == len(PORTS) - 1 == len(set(ports))
    assert 23001 not in ports
    assert min(ports) == 1024
    assert max(ports) == 65535
    assert ports[:100] != sorted(ports[:100])  # in random order


def _intro(facts: NatFacts, candidates: tuple[Candidate, ...] | None = None) -> Introduction:
    intro, _ = introductions((), ())
    if candidates is None:
        candidates = (
            Candidate(CandidateType.SERVER_REFLEXIVE, SRFLX),
            Candidate(CandidateType.HOST, HOST),
        )
    return attrs.evolve(intro, candidates=candidates, peer_nat=facts)


@attrs.define
class _Dials:
    """A fake :func:`punch.reuse.dial`: candidates are refused at once, probes never
    answer; every SYN's start, and when each probe ended, recorded."""

    starts: list[tuple[Endpoint, Endpoint, float]] = attrs.Factory(list)
    lifetimes: list[float] = attrs.Factory(list)

    async def __call__(
        self, local: Endpoint, remote: Endpoint, own: object, **_: object
    ) -> trio.SocketStream:
        start = trio.current_time()
        self.starts.append((local, remote, start))
        if remote in (SRFLX, HOST) and local.port:
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(111, "refused")
        try:
            await trio.sleep_forever()
        finally:
            self.lifetimes.append(trio.current_time() - start)
        raise AssertionError("unreachable")


async def test_a_scan_stays_under_200_syns_a_second_with_the_candidates_and_ends_each_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cone side (issue 16 part 3): random ports at the peer's NAT address from our
    port instead of its server-reflexive one, at most 200 SYNs in any one second
    with the host candidate's own attempts (each refused at once, so redialled 20
    times a second), every probe closed before the kernel would retransmit its
    SYN (1 s)."""
    dials = _Dials()
    race = dialling_race(
        _intro(RANDOM), LOCAL, options=PunchOptions(timeout=10.0), dial=dials, own_nat=CONE
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    times = [t for _, _, t in dials.starts]
    assert peak_rate(("host", t) for t in times) <= MAX_SYNS_PER_SECOND
    probes = [(lo, r) for lo, r, _ in dials.starts if r not in (SRFLX, HOST)]
    assert len(probes) > 9 * 170  # about 180 a second: the host candidate takes 20
    assert SRFLX not in {r for _, r, _ in dials.starts}
    assert {lo for lo, _ in probes} == {LOCAL}  # from our one port
    assert {r.ip for _, r in probes} == {SRFLX.ip}
    assert len({r.port for _, r in probes}) == len(probes)  # each port once
    assert max(dials.lifetimes) <= PROBE_LIFETIME + 1e-9  # (float sums)
    report = info.value.probes
    assert report is not None
    assert report.side == "scan"
    assert report.sent == len(probes)
    assert set(report.outcomes) == {"no-answer", "cancelled"}  # cancelled: at the deadline
    assert sum(report.outcomes.values()) == len(probes)
    assert report.matched == ()
    assert report.peak_open <= MAX_SYNS_PER_SECOND * PROBE_LIFETIME
    assert max_attempts_per_second(info.value.attempts) <= 20
    assert "birthday scan" in str(info.value)
    assert f"srflx {SRFLX}: not dialled: its NAT's other ports are probed" in str(info.value)


async def test_a_spray_dials_the_peer_s_endpoint_from_new_ports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Symmetric side: the peer's server-reflexive endpoint, each probe from port 0
    of our address (a new port, chosen by the kernel, a new random NAT port)."""
    dials = _Dials()
    race = dialling_race(
        _intro(CONE), LOCAL, options=PunchOptions(timeout=2.0), dial=dials, own_nat=RANDOM
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    probes = [(lo, r) for lo, r, _ in dials.starts if not lo.port]
    assert len(probes) > 300
    assert {lo for lo, _ in probes} == {Endpoint(LOCAL.ip, 0)}
    assert {r for _, r in probes} == {SRFLX}
    assert info.value.probes is not None
    assert info.value.probes.side == "spray"


async def test_without_both_nats_facts_nothing_is_probed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dials = _Dials()
    race = dialling_race(_intro(CONE), LOCAL, options=PunchOptions(timeout=1.0), dial=dials)
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert {r for _, r, _ in dials.starts} == {SRFLX, HOST}
    assert info.value.probes is None


async def test_two_endpoint_dependent_nats_dial_host_candidates_only_and_fail_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Symmetric x symmetric: the server-reflexive candidate is not dialled (named as
    such in the error), a shared LAN is tried for :data:`NO_PATH_TIMEOUT` s."""
    dials = _Dials()
    race = dialling_race(
        _intro(RANDOM), LOCAL, options=PunchOptions(timeout=10.0), dial=dials, own_nat=RANDOM
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert trio.current_time() == pytest.approx(NO_PATH_TIMEOUT)
    assert {r for _, r, _ in dials.starts} == {HOST}
    message = str(info.value)
    assert f"srflx {SRFLX}: not dialled: both NATs map endpoint-dependent" in message
    assert f"within {NO_PATH_TIMEOUT:g} s" in message


@asynccontextmanager
async def _peer_listener(drop_all: bool = False) -> AsyncIterator[trio.SocketListener]:
    """The peer's "public" endpoint on 127.0.0.2; ``drop_all``: every SYN dropped (a
    socket filter), so a dial waits in SYN_SENT as behind a dropping NAT."""
    sock = bind_reusable(Endpoint("127.0.0.2", 0))
    with sock:
        sock.listen(128)
        if drop_all:
            _attach_filter(sock, _DROP_ALL)
        yield trio.SocketListener(sock)


async def test_a_probe_that_connects_is_authenticated_and_nominated_like_a_candidate() -> None:
    """Real sockets on loopback: a spray's probe reaches the peer's (public) listener,
    which proves the secret there; the probe's stream is nominated, recorded as a
    probe attempt, from a new port (the candidate itself is not dialled)."""
    async with _peer_listener() as listener:
        srflx = Endpoint.from_sockaddr(listener.socket.getsockname())
        intro, peer_intro = introductions((), ())
        intro = attrs.evolve(
            intro, candidates=(Candidate(CandidateType.SERVER_REFLEXIVE, srflx),), peer_nat=CONE
        )
        accepted: list[trio.SocketStream] = []
        async with race_side(Endpoint("127.0.0.1", 0)) as (local, router):

            async def peer() -> None:
                while True:
                    stream = await listener.accept()
                    accepted.append(stream)
                    await (await play_peer(stream, peer_intro)).nominated()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer)
                args = {"introduction": intro, "local": local, "own_nat": RANDOM}
                won = await run_race(router, args)
                nursery.cancel_scope.cancel()
        for stream in accepted:
            await stream.aclose()
        assert won.probes is not None
        assert won.probes.side == "spray"
        assert won.probes.matched == (f"srflx {srflx}",)
        assert won.local.port != local.port  # from a new port
        nominated = [a for a in won.attempts if a.outcome is Outcome.NOMINATED]
        assert len(nominated) == 1
        assert nominated[0].probe
        await won.aclose()


async def test_every_probe_socket_is_closed_when_the_punch_ends() -> None:
    """Real sockets: the peer's endpoint drops every SYN, so each probe waits in
    SYN_SENT for its lifetime; over a 2 s punch about 180 descriptors are open at
    once, and not one is left after."""
    async with _peer_listener(drop_all=True) as listener:
        srflx = Endpoint.from_sockaddr(listener.socket.getsockname())
        before = open_fds()
        async with race_side(Endpoint("127.0.0.1", 0)) as (local, router):
            intro = _intro(CONE, (Candidate(CandidateType.SERVER_REFLEXIVE, srflx),))
            args = {
                "introduction": intro,
                "local": local,
                "own_nat": RANDOM,
                "options": PunchOptions(timeout=2.0),
            }
            with pytest.raises(PunchFailed) as info:
                await run_race(router, args)
        assert open_fds() == before
    report = info.value.probes
    assert report is not None
    assert report.sent > 300
    assert report.peak_open > 100
    assert set(report.outcomes) == {"no-answer", "cancelled"}
    assert sum(report.outcomes.values()) == report.sent
