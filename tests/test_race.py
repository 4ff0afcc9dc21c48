"""The accept-vs-connect race: real sockets on loopback, timing on MockClock."""

from __future__ import annotations

import contextlib
import errno
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from punch import (
    Endpoint,
    HandshakeError,
    Outcome,
    PeerStream,
    PunchFailed,
    Role,
    SelfDialError,
    WonBy,
    open_host,
    reuse,
)
from punch._endpoint import Candidate, CandidateType
from punch._handshake import Handshake
from punch._nat import PREDICTION_WINDOW, Allocation, Mapping, NatFacts
from punch._outcome import max_attempts_per_second
from punch._protocol import Introduction
from punch._race import Inbound, InboundRouter, PunchOptions, Race
from punch._tls import TLSStream
from tests.helpers import (
    IDENTITY,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    Player,
    introductions,
    nonblocking_client,
    open_fds,
    play_peer,
    race_side,
    rto_max_ms,
    run_race,
    tcp_state,
)

ANY = Endpoint("0.0.0.0", 0)
LOOPBACK = Endpoint("127.0.0.1", 0)


async def _race_pair(paths: tuple[str, ...]) -> tuple[PeerStream, PeerStream]:
    """Two real races; each side reachable at every address in ``paths``."""
    results: dict[Role, PeerStream] = {}
    async with race_side(ANY) as (i_local, i_router), race_side(ANY) as (r_local, r_router):
        to_i = tuple(Endpoint(ip, i_local.port) for ip in paths)
        to_r = tuple(Endpoint(ip, r_local.port) for ip in paths)
        intro_i, intro_r = introductions(to_i, to_r)

        async def side(intro, local, router) -> None:  # type: ignore[no-untyped-def]
            results[intro.role] = await run_race(router, {"introduction": intro, "local": local})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, intro_i, i_local, i_router)
            nursery.start_soon(side, intro_r, r_local, r_router)
    return results[Role.INITIATOR], results[Role.RESPONDER]


async def _assert_same_connection(initiator: PeerStream, responder: PeerStream) -> None:
    assert (initiator.local, initiator.remote) == (responder.remote, responder.local)
    assert initiator.socket.getsockname()[:2] == responder.socket.getpeername()[:2]
    await initiator.send_all(b"ping")
    assert await responder.receive_some(4) == b"ping"
    await responder.send_all(b"pong")
    assert await initiator.receive_some(4) == b"pong"


@pytest.mark.parametrize("paths", [("127.0.0.1",), ("127.0.0.1", "127.0.0.2", "127.0.0.3")])
async def test_both_sides_keep_the_same_connection(paths: tuple[str, ...]) -> None:
    for _ in range(5):  # several rounds: which path wins varies, agreement must not
        initiator, responder = await _race_pair(paths)
        assert (initiator.role, responder.role) == (Role.INITIATOR, Role.RESPONDER)
        assert initiator.attempt_id == responder.attempt_id
        capped = reuse.PUNCH_RTO_MAX_MS
        system = reuse._sysctl("tcp_rto_max_ms", reuse.DEFAULT_RTO_MAX_MS)
        # the punch's 1 s retransmission cap holds until the peer's first bytes arrive
        # (our last handshake message may still be unacknowledged), then lifts
        for kept in (initiator, responder):
            assert rto_max_ms(kept.socket) in (None, capped)
        await _assert_same_connection(initiator, responder)
        for kept in (initiator, responder):
            assert rto_max_ms(kept.socket) in (None, system)
        await initiator.aclose()
        await responder.aclose()


async def test_every_losing_socket_is_closed() -> None:
    before = open_fds()
    initiator, responder = await _race_pair(("127.0.0.1", "127.0.0.2", "127.0.0.3"))
    assert open_fds() == before + 2  # the two ends of the one kept connection
    await initiator.aclose()
    await responder.aclose()
    assert open_fds() == before


async def test_responder_holds_every_authenticated_stream_until_the_nomination() -> None:
    async with race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), ())  # the responder only accepts here
        router.open_route(intro_r.attempt_id)  # as Host does on receiving the introduction
        result: list[tuple[PeerStream, bytes]] = []
        first_stream = await trio.open_tcp_stream(local.ip, local.port)
        second_stream = await trio.open_tcp_stream(local.ip, local.port)
        async with first_stream, second_stream, trio.open_nursery() as nursery:

            async def respond() -> None:
                kept = await run_race(router, {"introduction": intro_r, "local": local})
                result.append((kept, await kept.receive_some(100)))

            nursery.start_soon(respond)
            nominee = second_stream.socket.getsockname()
            first = await play_peer(first_stream, intro_i)
            second = await play_peer(second_stream, intro_i)
            # both are authenticated now; nominate the second, with early application data
            await second.nominate()
            await second.reader.send(b"early bytes")
            with pytest.raises(HandshakeError):
                await first.reader.exactly(1)  # the other authenticated stream gets closed
        [(kept, early)] = result
        assert kept.socket.getpeername() == nominee
        assert kept.won_by is WonBy.ACCEPT
        assert early == b"early bytes"  # not lost to the handshake reader
        await kept.aclose()


async def test_a_hello_for_an_expired_attempt_is_reset_while_a_live_one_is_routed() -> None:
    """Once an attempt's punch has ended (its route closed), its genuine Hello,
    late or replayed, finds nothing: the connection is reset, no other attempt sees it."""
    async with race_side(LOOPBACK) as (local, router):
        expired_i, expired_r = introductions((), ())
        live_i, live_r = introductions((), ())
        router.open_route(expired_r.attempt_id)
        live = router.open_route(live_r.attempt_id)
        router.close_route(expired_r.attempt_id)  # that punch ended; the listener stays for live
        hello = Handshake(Role.INITIATOR, expired_i.attempt_id, expired_i.secret).hello()
        with trio.fail_after(5):
            async with await trio.open_tcp_stream(local.ip, local.port) as late:
                await late.send_all(hello)
                with pytest.raises(trio.BrokenResourceError):  # an RST, not a FIN
                    await late.receive_some(1)
            async with await trio.open_tcp_stream(local.ip, local.port) as current:
                await current.send_all(
                    Handshake(Role.INITIATOR, live_i.attempt_id, live_i.secret).hello()
                )
                inbound = await live.receive()
        assert inbound.hello.attempt_id == live_r.attempt_id
        await inbound.reader.stream.aclose()
        with pytest.raises(trio.WouldBlock):
            live.receive_nowait()  # the expired attempt's connection never came here
        router.close_route(live_r.attempt_id)


CLIENT = IDENTITY.tls_context(IDENTITY.certificate, server_side=False)
SERVER = IDENTITY.tls_context(IDENTITY.certificate, server_side=True)


def _unloadable() -> ssl.SSLContext:
    raise ssl.SSLError("not a certificate")


async def _nominated_against_a_player(
    tls: Callable[[], ssl.SSLContext],
) -> tuple[PeerStream, Player]:
    """A real initiator's race (with ``tls``) against a hand-played responder, up
    to the Nomination: (the kept stream, the responder's side)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    endpoint = Endpoint.from_sockaddr(listener.socket.getsockname())
    intro_i, intro_r = introductions((), (endpoint,))
    players = []

    async def respond() -> None:
        player = await play_peer(await listener.accept(), intro_r)
        await player.nominated()
        players.append(player)

    async with race_side(LOOPBACK) as (local, router), listener:
        race = {"introduction": intro_i, "local": local, "tls": tls}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(respond)
            kept = await run_race(router, race)
    return kept, players[0]


async def test_the_initiator_sends_its_client_hello_with_its_hello() -> None:
    """The ClientHello follows the Hello at once, one whole TLS handshake record
    with its length first, and the kept stream's TLS goes on from it."""
    kept, peer = await _nominated_against_a_player(lambda: CLIENT)
    record = peer.shake.client_hello
    assert record is not None
    assert record[:1] == b"\x16"  # handshake (RFC 8446 §5.1)
    assert len(record) == 5 + int.from_bytes(record[3:5], "big")
    assert record[5] == 1  # ClientHello (§4)
    assert peer.reader.buffer == b""  # and nothing came after the Nomination
    theirs = TLSStream(peer.reader.stream, SERVER, server_side=True, pending=record)
    await _sealed(kept, theirs)


async def _sealed(kept: PeerStream, theirs: TLSStream) -> None:
    """Finish TLS on the kept stream (from where the race left it) and on the
    player's end, and carry one message sealed across; closes both."""
    server_side = kept.role is Role.RESPONDER
    async with kept, theirs, trio.open_nursery() as nursery:
        nursery.start_soon(theirs.do_handshake)
        await kept.start_tls(SERVER if server_side else CLIENT, server_side=server_side)
        await theirs.send_all(b"sealed")
        assert await kept.receive_some(6) == b"sealed"


async def test_a_client_context_that_cannot_be_made_leaves_tls_to_after_the_race() -> None:
    """A certificate OpenSSL cannot load: the Hello goes alone and the stream is
    kept; TLS after the race refuses the certificate with its typed error."""
    kept, peer = await _nominated_against_a_player(_unloadable)
    assert peer.shake.client_hello is None  # no ClientHello came with the Hello
    await kept.aclose()
    await peer.reader.stream.aclose()


async def _responder_against_a_player(
    tls: Callable[[], ssl.SSLContext],
) -> tuple[PeerStream, TLSStream, bytes]:
    """A real responder's race (with ``tls``) against a hand-played initiator that
    sends its ClientHello with its Hello: (the kept stream, the initiator's TLS,
    the bytes it had read after the Proof before it nominated)."""
    async with race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), ())  # the responder only accepts here
        router.open_route(intro_r.attempt_id)
        result: list[PeerStream] = []
        stream = await trio.open_tcp_stream(local.ip, local.port)
        async with trio.open_nursery() as nursery:

            async def respond() -> None:
                race = {"introduction": intro_r, "local": local, "tls": tls}
                result.append(await run_race(router, race))

            nursery.start_soon(respond)
            ours = TLSStream(stream, CLIENT, server_side=False)
            player = await play_peer(stream, intro_i, client_hello=ours.flight())
            before = b""
            if tls is not _unloadable:  # the server flight, before any Nomination
                before = await player.reader.exactly(1)
            before += bytes(player.reader.buffer)
            await player.nominate()
        ours.feed(before)
        player.reader.buffer.clear()
    [kept] = result
    return kept, ours, before


async def test_the_responder_answers_the_client_hello_before_the_nomination() -> None:
    """The server flight leaves as the ClientHello is read: the initiator holds it
    before it nominates, and both TLS ends finish from there."""
    kept, ours, before = await _responder_against_a_player(lambda: SERVER)
    assert before[:1] == b"\x16"  # a handshake record...
    assert before[5] == 2  # ...that begins with a ServerHello (RFC 8446 §4)
    await _sealed(kept, ours)


async def test_a_server_context_that_cannot_be_made_keeps_the_client_hello_for_later() -> None:
    """No server flight during the race; TLS after it reads the ClientHello again."""
    kept, ours, before = await _responder_against_a_player(_unloadable)
    assert before == b""
    await _sealed(kept, ours)


async def test_initiator_nominates_one_stream_and_closes_the_rest() -> None:
    listeners = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(3)]
    endpoints = tuple(Endpoint.from_sockaddr(lst.socket.getsockname()) for lst in listeners)
    outcomes: dict[Endpoint, str] = {}  # our end of each accepted connection -> what happened
    async with race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), endpoints)
        result: list[PeerStream] = []

        async def answer(listener: trio.SocketListener) -> None:
            async with await listener.accept() as stream:
                here = Endpoint.from_sockaddr(stream.socket.getsockname())
                try:
                    peer = await play_peer(stream, intro_r)
                    await peer.nominated()
                    outcomes[here] = "nominated"
                    await trio.sleep_forever()  # hold it until the test ends
                except HandshakeError:
                    outcomes[here] = "closed"

        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(answer, listener)
            result.append(await run_race(router, {"introduction": intro_i, "local": local}))
            # the initiator does not wait for the responder to read its nomination
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            nursery.cancel_scope.cancel()
        [kept] = result
        nominated = [here for here, what in outcomes.items() if what == "nominated"]
        assert nominated == [kept.remote]
        assert all(what == "closed" for here, what in outcomes.items() if here != kept.remote)
        await kept.aclose()
    for listener in listeners:
        await listener.aclose()


@asynccontextmanager
async def _one_listener() -> AsyncIterator[tuple[trio.SocketListener, Endpoint]]:
    """A loopback listener playing the remote peer, and the endpoint to dial it at."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        yield listener, Endpoint.from_sockaddr(listener.socket.getsockname())


async def test_the_initiator_holds_its_stream_once_it_nominates_without_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _one_listener() as (listener, silent), race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), (silent,))
        nominated = trio.Event()

        async def responder() -> None:  # proves itself, reads the nomination, says nothing
            async with await listener.accept() as stream:
                peer = await play_peer(stream, intro_r)
                await peer.nominated()
                nominated.set()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(responder)
            start = trio.current_time()
            kept = await run_race(router, {"introduction": intro_i, "local": local})
            held_after = trio.current_time() - start
            await nominated.wait()
            nursery.cancel_scope.cancel()
        assert kept.remote == silent
        assert held_after == 0  # no virtual time passed: nothing waited for an answer
        await kept.aclose()


REFUSED = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def dialling_race(introduction: Introduction, local: Endpoint, **options: Any) -> Race:
    """A :class:`Race` that only dials: nothing ever arrives on its inbound channel."""
    _, inbound = trio.open_memory_channel[Inbound](0)
    return Race(introduction, local, inbound, **options)


def _fake_dial(  # type: ignore[no-untyped-def]
    behaviour: dict[Endpoint, float | None],
    log: dict[Endpoint, list[float]],
    error: OSError = REFUSED,
):
    """Raise ``error`` after ``behaviour[remote]`` virtual seconds (None: never answer)."""

    async def dial(
        local: Endpoint, remote: Endpoint, own: object, **_: object
    ) -> trio.SocketStream:
        log.setdefault(remote, []).append(trio.current_time())
        delay = behaviour[remote]
        if delay is None:
            await trio.sleep_forever()
        await trio.sleep(delay)
        raise error

    return dial


async def test_the_first_candidate_s_syn_leaves_first_whatever_order_trio_picks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Trio runs a batch of new tasks in either order, and a dial runs up to its SYN
    without a checkpoint: the first candidate must still be dialled first (a failing
    host candidate's dial ahead of it delayed the server-reflexive SYN by up to
    0.5 ms). 16 races: by chance alone, 1 in 32,768."""
    endpoints = tuple(Endpoint(f"192.0.2.{i}", i) for i in (1, 2, 3))
    for _ in range(16):
        dialled: dict[Endpoint, list[float]] = {}
        intro, _ = introductions((), endpoints)
        options = PunchOptions(timeout=0.1, pacing=0.05)
        dial = _fake_dial({e: 0 for e in endpoints}, dialled)
        with pytest.raises(PunchFailed):
            await dialling_race(intro, LOOPBACK, options=options, dial=dial).run()
        assert next(iter(dialled)) == endpoints[0]


async def test_the_deadline_and_every_time_count_from_the_introduction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The host hands the race the time its introduction arrived: the route and the
    task in between are part of the punch's cost, and of its timeout."""
    silent = Endpoint("192.0.2.2", 2)
    intro, _ = introductions((), (silent,))
    start = trio.current_time()
    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=1.0, pacing=0.5),
        dial=_fake_dial({silent: None}, {}),
        introduced_at=start - 0.25,
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert trio.current_time() - start == pytest.approx(0.75)
    assert [a.started for a in info.value.attempts] == pytest.approx([0.25])


async def test_a_route_opened_and_closed_at_once_leaves_the_router_clean() -> None:
    """A race that fails before its first checkpoint opens and closes its route
    with no checkpoint between: the accept task then first runs after the
    listener has stopped, perhaps after the router itself has (trio picks the
    order at random, so 20 rounds catch it; an assertion used to fail there)."""
    for _ in range(20):
        async with race_side(LOOPBACK) as (_, router):
            router.open_route(b"q" * 16)
            router.close_route(b"q" * 16)
        assert not router.listening


async def test_the_router_listens_while_held_routes_or_not() -> None:
    """An initiator holds the listener open while its introduction is on the way:
    a SYN then meets a listener, a route closed meanwhile does not close it, and the
    release with no route left does."""
    async with race_side(LOOPBACK) as (local, router):
        assert not router.listening
        with router.listen_meanwhile():
            assert router.listening
            with nonblocking_client("127.0.0.1") as early:
                early.connect_ex(local.sockaddr())
                # loopback delivers within connect(): a listener has answered by now
                assert tcp_state(early) == TCP_ESTABLISHED
            router.open_route(b"h" * 16)  # the introduction
            router.close_route(b"h" * 16)
            assert router.listening
            router.open_route(b"i" * 16)
        assert router.listening  # a route still open
        router.close_route(b"i" * 16)
        assert not router.listening
        with router.listen_meanwhile():
            pass
        assert not router.listening
        with nonblocking_client("127.0.0.1") as late:
            late.connect_ex(local.sockaddr())
            assert tcp_state(late) == TCP_CLOSE  # refused: nothing listens


async def test_the_router_s_listener_leaves_dropped_endpoints_syns_unanswered() -> None:
    """A drop asked for before the listener opens holds on it (the listener opens
    with the first route), and ends with the last matching stop."""
    async with race_side(LOOPBACK) as (local, router):
        dropped, passed = nonblocking_client("127.0.0.1"), nonblocking_client("127.0.0.1")
        with dropped, passed:
            source = Endpoint.from_sockaddr(dropped.getsockname())
            router.drop_syns_from(source)
            router.drop_syns_from(source)  # a second race dialling the same peer
            router.open_route(b"r" * 16)
            for sock in (dropped, passed):
                sock.connect_ex(local.sockaddr())
            # loopback delivers within connect(): any SYN-ACK has arrived by now
            assert tcp_state(dropped) == TCP_SYN_SENT
            assert tcp_state(passed) == TCP_ESTABLISHED
            router.stop_dropping_syns_from(source)
            assert router.dropping == {source}  # the other race still dials it
            router.stop_dropping_syns_from(source)
            assert router.dropping == frozenset()
        router.close_route(b"r" * 16)


async def test_our_listener_drops_a_dialled_candidate_s_syns_until_the_race_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once our dial to a server-reflexive candidate is refused, the peer's SYN must
    not meet our listener (its SYN-ACK's fresh ISN is outside what our NAT tracks),
    and the refusal may come back after the SYN: so from the first dial on, the race
    has the router drop that candidate's SYNs. Not an IPv4 host candidate's (a LAN
    peer, reached without a NAT), and none once the race is over."""
    refused, silent, lan = (Endpoint(f"192.0.2.{i}", i) for i in (1, 2, 3))
    intro, _ = introductions((), ())
    srflx = tuple(Candidate(CandidateType.SERVER_REFLEXIVE, e) for e in (refused, silent))
    intro = attrs.evolve(intro, candidates=(*srflx, Candidate(CandidateType.HOST, lan)))
    router = InboundRouter(LOOPBACK)
    seen: dict[Endpoint, list[frozenset[Endpoint]]] = {}
    dial = _fake_dial({refused: 0, silent: None, lan: 0}, {})

    async def watching(
        local: Endpoint, remote: Endpoint, own: object, *, redial: reuse.Redial | None
    ) -> trio.SocketStream:
        seen.setdefault(remote, []).append(router.dropping)
        return await dial(local, remote, own)

    race = Race(
        intro,
        LOOPBACK,
        router.open_route(intro.attempt_id),
        options=PunchOptions(timeout=0.3, pacing=0.1),
        dial=watching,
        router=router,
    )
    with pytest.raises(PunchFailed):
        await race.run()
    assert seen[refused][0] >= {refused}  # already at its first dial
    assert all(s == {refused, silent} for s in seen[refused][1:] + seen[lan][1:])
    assert all(lan not in s for s in seen[lan])
    assert router.dropping == frozenset()  # the race is over: every SYN is answered again


async def test_after_an_rst_the_next_attempt_primes_our_nat_and_the_one_after_redials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An RST closed our NAT's entry and the peer's NAT refuses our SYNs: at once, a
    priming SYN opens our entry (and dies on the way); the next attempt connects
    that socket again. Refusal, prime, refusal..., at most 20 attempts in any second,
    primes included. Never for an IPv4 host candidate (no NAT on a LAN path), after
    an ICMP refusal (its socket is kept, and our NAT's entry with it), or after an
    RST that took 30 ms (a round trip that wide lets the next plain SYN cross)."""
    rst, icmp, far, lan = (Endpoint(f"192.0.2.{i}", i) for i in (1, 2, 3, 4))
    intro, _ = introductions((), ())
    srflx = tuple(Candidate(CandidateType.SERVER_REFLEXIVE, e) for e in (rst, icmp, far))
    intro = attrs.evolve(intro, candidates=(*srflx, Candidate(CandidateType.HOST, lan)))
    dialled: dict[Endpoint, list[float]] = {}
    refuse = _fake_dial({rst: 0, icmp: 0, far: 0.03, lan: 0}, dialled)
    primed: dict[Endpoint, list[float]] = {}

    async def dial(
        local: Endpoint, remote: Endpoint, own: object, *, redial: reuse.Redial | None
    ) -> trio.SocketStream:
        if remote == icmp and redial is not None:  # as reuse.dial does after an ICMP error
            redial._keep(trio.socket.socket(), remote)
        return await refuse(local, remote, own)

    def prime(local: Endpoint, remote: Endpoint, redial: reuse.Redial, own: object) -> None:
        primed.setdefault(remote, []).append(trio.current_time())

    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=2.5, pacing=0.1),
        dial=dial,
        prime=prime,
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert list(primed) == [rst]
    assert primed[rst][:3] == pytest.approx([0.0, 0.05, 0.1])  # each right after a refusal
    assert dialled[rst][:3] == pytest.approx([0.0, 0.05, 0.1])
    assert len(dialled[icmp]) == len(dialled[far]) == len(dialled[lan]) == 50  # every 50 ms
    attempts = info.value.attempts
    outcomes = [a.outcome for a in attempts if a.candidate.endpoint == rst]
    assert outcomes == [Outcome.REFUSED, Outcome.PRIMED] * len(primed[rst])
    assert max_attempts_per_second(attempts) == 20  # the cap holds the primes in, too


async def test_failure_names_every_candidate_and_its_cause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused, silent = Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2)
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), (refused, silent))
    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=0.95, pacing=0.1),
        dial=_fake_dial({refused: 0, silent: None}, attempts),
    )
    start = trio.current_time()
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert trio.current_time() - start == pytest.approx(0.95)
    group = info.value.__cause__
    assert isinstance(group, ExceptionGroup)
    failures = {e.candidate.endpoint: e for e in group.exceptions}
    assert set(failures) == {refused, silent}
    assert failures[refused].attempts == 19  # refused: re-dialled every MIN_PACING
    assert isinstance(failures[refused].__cause__, ConnectionRefusedError)
    assert failures[silent].attempts == 1
    assert isinstance(failures[silent].__cause__, TimeoutError)
    # the same story as data: every attempt, its times from the introduction, its outcome
    by_candidate = {
        c: [a for a in info.value.attempts if a.candidate.endpoint == c] for c in (refused, silent)
    }
    assert [a.number for a in by_candidate[refused]] == list(range(1, 20))
    assert {a.outcome for a in by_candidate[refused]} == {Outcome.REFUSED}
    assert [a.started for a in by_candidate[refused]] == pytest.approx(
        [0.05 * i for i in range(19)]
    )
    assert "ConnectionRefusedError" in (by_candidate[refused][0].error or "")
    [unanswered] = by_candidate[silent]
    assert (unanswered.outcome, unanswered.started) == (Outcome.NO_ANSWER, 0.0)
    assert unanswered.ended == pytest.approx(0.95)
    assert not info.value.authentication_failed
    assert "192.0.2.1:1" in str(info.value)
    assert "192.0.2.2:2" in str(info.value)
    assert isinstance(info.value, OSError)


async def test_pacing_holds_between_attempts_to_one_candidate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fast, slow = Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2)
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), (fast, slow))
    start = trio.current_time()
    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=2.0, pacing=0.25),
        dial=_fake_dial({fast: 0, slow: 0.4}, attempts, ConnectionResetError(errno.ECONNRESET, "")),
    )
    with pytest.raises(PunchFailed):
        await race.run()
    fast_times = [t - start for t in attempts[fast]]
    slow_times = [t - start for t in attempts[slow]]
    # failed at once: one attempt every 0.25 s, never sooner, never a busy loop
    assert fast_times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    # an attempt slower than the pacing is followed at once by the next
    assert slow_times == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6])


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "RST or ICMP port unreachable"),
        OSError(errno.EHOSTUNREACH, "ICMP host unreachable or administratively prohibited"),
        OSError(errno.ENETUNREACH, "ICMP net unreachable"),
        PermissionError(errno.EACCES, "ICMPv6 administratively prohibited"),
    ],
)
async def test_a_refused_attempt_is_dialled_again_as_soon_as_the_rate_allows(
    autojump_clock: trio.testing.MockClock, error: OSError
) -> None:
    at_once, after_a_round_trip, late = (Endpoint(f"192.0.2.{i}", i) for i in (1, 2, 3))
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), (at_once, after_a_round_trip, late))
    start = trio.current_time()
    behaviour = {at_once: 0.0, after_a_round_trip: 0.03, late: 0.07}
    options = PunchOptions(timeout=0.2, pacing=0.1)
    race = dialling_race(
        intro, LOOPBACK, options=options, dial=_fake_dial(behaviour, attempts, error)
    )
    with pytest.raises(PunchFailed):
        await race.run()

    def times(remote: Endpoint) -> list[float]:
        return [t - start for t in attempts[remote]]

    # MIN_PACING (0.05 s) after the start of the refused attempt, not the pacing
    assert times(at_once) == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert times(after_a_round_trip) == pytest.approx([0.0, 0.05, 0.1, 0.15])
    # a refusal later than MIN_PACING is followed at once
    assert times(late) == pytest.approx([0.0, 0.07, 0.14])


async def test_every_candidate_being_our_own_is_a_self_dial_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    local, observed = Endpoint("10.0.1.2", 4000), Endpoint("203.0.113.11", 4000)
    intro, _ = introductions((), (local, observed))
    start = trio.current_time()
    with pytest.raises(SelfDialError, match="every candidate"):
        await dialling_race(intro, local, own=frozenset({observed})).run()
    assert trio.current_time() == start  # at once, never a hang


async def test_our_own_endpoint_is_skipped_and_the_others_dialled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    local, other = Endpoint("10.0.1.2", 4000), Endpoint("203.0.113.12", 4000)
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), (local, other))
    race = dialling_race(
        intro,
        local,
        options=PunchOptions(timeout=0.5),
        dial=_fake_dial({other: 0}, attempts),
    )
    with pytest.raises(PunchFailed):
        await race.run()
    assert set(attempts) == {other}


BAD_OPTIONS = [
    ({"timeout": 0}, ValueError),
    ({"timeout": -1}, ValueError),
    ({"timeout": float("inf")}, ValueError),
    ({"timeout": float("nan")}, ValueError),
    ({"timeout": True}, TypeError),
    ({"timeout": "10"}, TypeError),
    ({"pacing": 0.049}, ValueError),
    ({"pacing": True}, TypeError),
]


@pytest.mark.parametrize(("knob", "error"), BAD_OPTIONS)
def test_bad_timeout_or_pacing_is_refused(knob: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match=r"timeout|pacing"):
        PunchOptions(**knob)  # type: ignore[arg-type]


@pytest.mark.parametrize(("knob", "error"), BAD_OPTIONS)
async def test_open_host_refuses_a_bad_knob_before_any_socket(
    knob: dict[str, object], error: type[Exception]
) -> None:
    before = open_fds()
    with pytest.raises(error, match=r"timeout|pacing"):
        # nothing listens on the discard port: reaching it would be another error
        async with open_host("bad-knob", rendezvous="127.0.0.1:9", **knob):  # type: ignore[arg-type]
            raise AssertionError("unreachable")
    assert open_fds() == before


async def test_connect_refuses_a_bad_timeout(punch_rendezvous: Endpoint) -> None:
    async with open_host("knobs", rendezvous=punch_rendezvous) as host:
        with pytest.raises(TypeError, match="timeout"):
            await host.connect("anyone", timeout=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await host.connect("anyone", timeout=0)


async def test_a_stranger_fails_the_handshake_and_the_race_goes_on() -> None:
    async with race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), ())
        # knows the attempt id (it is in every Hello) but not the secret
        stranger_intro = attrs.evolve(intro_i, secret=b"\x00" * 32)
        router.open_route(intro_r.attempt_id)  # as Host does on receiving the introduction
        result: list[PeerStream] = []
        stranger = await trio.open_tcp_stream(local.ip, local.port)
        real_stream = await trio.open_tcp_stream(local.ip, local.port)
        async with stranger, real_stream, trio.open_nursery() as nursery:

            async def respond() -> None:
                result.append(await run_race(router, {"introduction": intro_r, "local": local}))

            nursery.start_soon(respond)
            real_end = real_stream.socket.getsockname()
            with pytest.raises(HandshakeError):
                await play_peer(stranger, stranger_intro)  # the race's proof fails for it
            real = await play_peer(real_stream, intro_i)
            await real.nominate()
        [kept] = result
        assert kept.socket.getpeername() == real_end
        await kept.aclose()


async def test_a_handshake_cut_short_is_retried_but_a_failed_proof_is_not() -> None:
    async with _one_listener() as (listener, target), race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), (target,))
        result: list[PeerStream] = []
        async with trio.open_nursery() as nursery:

            async def initiate() -> None:
                result.append(await run_race(router, {"introduction": intro_i, "local": local}))

            nursery.start_soon(initiate)
            for _ in range(2):  # cut the first two connections before the handshake ends
                cut = await listener.accept()
                await cut.aclose()
            async with await listener.accept() as stream:
                peer = await play_peer(stream, intro_r)
                await peer.nominated()
                kept_end = stream.socket.getsockname()
        [kept] = result  # the nursery waited for the race to return
        assert kept.socket.getpeername() == kept_end
        assert [a.outcome for a in kept.attempts] == [
            Outcome.HANDSHAKE_INTERRUPTED,
            Outcome.HANDSHAKE_INTERRUPTED,
            Outcome.NOMINATED,
        ]
        assert [a.number for a in kept.attempts] == [1, 2, 3]
        await kept.aclose()


async def test_a_stranger_that_answers_is_an_authentication_failure_as_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _one_listener() as (listener, target), race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), (target,))
        stranger = attrs.evolve(intro_r, secret=bytes(32))  # right attempt, wrong secret

        async def answer() -> None:
            async with await listener.accept() as stream:
                await play_peer(stream, stranger)  # proves a secret the race does not share
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            race = {"introduction": intro_i, "local": local, "options": PunchOptions(timeout=1.0)}
            with pytest.raises(PunchFailed) as info:
                await run_race(router, race)
            nursery.cancel_scope.cancel()
    assert info.value.authentication_failed
    [attempt] = info.value.attempts  # a failed proof is not dialled again
    assert attempt.outcome is Outcome.HANDSHAKE_FAILED
    assert "does not match" in (attempt.error or "")


async def test_a_silent_attempt_after_a_refusal_is_dialled_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    remote = Endpoint("192.0.2.3", 3)
    starts: list[float] = []
    script = iter(["refuse", "hang", "refuse", "hang"])

    async def dial(
        local: Endpoint, remote: Endpoint, own: object, **_: object
    ) -> trio.SocketStream:
        starts.append(trio.current_time())
        if next(script, "hang") == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    intro, _ = introductions((), (remote,))
    start = trio.current_time()
    with pytest.raises(PunchFailed):
        await dialling_race(intro, LOOPBACK, options=PunchOptions(5.0, 0.1), dial=dial).run()
    # refused at 0; silent from 0.05 (MIN_PACING after a refusal), given up at
    # 1.05 and dialled again at once, refused; silent from 1.1, given up at 2.1;
    # silent again from 2.1 to the deadline, for a silence that follows a
    # silence is left to the kernel
    assert [t - start for t in starts] == pytest.approx([0.0, 0.05, 1.05, 1.1, 2.1])


async def test_a_silent_first_attempt_is_left_to_the_kernel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silent = Endpoint("192.0.2.2", 2)
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), (silent,))
    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(5.0),
        dial=_fake_dial({silent: None}, attempts),
    )
    with pytest.raises(PunchFailed):
        await race.run()
    assert len(attempts[silent]) == 1  # never aborted: its SYN retransmits keep one ISN


async def test_at_most_eight_remote_candidates_are_dialled(autojump_clock: trio.abc.Clock) -> None:
    local = Endpoint("127.0.0.1", 40000)
    many = tuple(Endpoint(f"192.0.2.{i}", 5000) for i in range(1, 10))  # 9, as 1 srflx + 8 hosts
    attempts: dict[Endpoint, list[float]] = {}
    intro, _ = introductions((), many)
    race = dialling_race(
        intro,
        local,
        options=PunchOptions(timeout=0.5),
        dial=_fake_dial(dict.fromkeys(many, 0), attempts),
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert set(attempts) == set(many[:8])
    assert len(info.value.__cause__.exceptions) == 8


@pytest.mark.parametrize(
    ("action", "at", "ended"),
    [("nominate", 12.5, 12.5), ("nominate", 13.5, 13.0), ("close", 11, 11)],
)
async def test_a_responder_waits_past_its_deadline_for_a_late_nomination(
    slow_autojump_clock: trio.testing.MockClock, action: str, at: float, ended: float
) -> None:
    """An initiator nominates without waiting for an answer, so a Nomination that loss
    delays must still be taken: while a stream lacks only it, the race's 10 s deadline
    moves NOMINATION_GRACE (3 s) later, and back once that stream is gone."""
    async with race_side(LOOPBACK) as (local, router):
        intro_i, intro_r = introductions((), ())
        router.open_route(intro_r.attempt_id)
        outcome: list[PeerStream | PunchFailed] = []
        ends: list[float] = []

        async def respond() -> None:
            try:
                outcome.append(await run_race(router, {"introduction": intro_r, "local": local}))
            except PunchFailed as exc:
                outcome.append(exc)
            ends.append(trio.current_time() - start)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(respond)
            await trio.sleep(9.5)  # connected and authenticated just before the deadline
            async with await trio.open_tcp_stream(local.ip, local.port) as stream:
                peer = await play_peer(stream, intro_i)
                await trio.sleep_until(start + at)
                if action == "nominate":
                    with contextlib.suppress(HandshakeError):  # too late: reset
                        await peer.nominate()
    [result] = outcome
    assert isinstance(result, PeerStream) is (ended == at and action == "nominate")
    assert ended <= ends[0] < ended + 0.1
    if isinstance(result, PeerStream):
        await result.aclose()


async def test_an_attempt_connected_but_mute_at_the_deadline_says_so(
    slow_autojump_clock: trio.testing.MockClock,
) -> None:
    """Connected, but no handshake message came back (lost, under loss): the attempt is
    HANDSHAKE_UNFINISHED, not NO_ANSWER, which is kept for a SYN nobody answered."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    mute = Endpoint.from_sockaddr(listener.socket.getsockname())
    intro, _ = introductions((), (mute,))

    async def dial(
        local: Endpoint, remote: Endpoint, own: object, **_: object
    ) -> trio.SocketStream:
        return await trio.open_tcp_stream(remote.ip, remote.port)

    race = dialling_race(intro, LOOPBACK, options=PunchOptions(timeout=1.0), dial=dial)
    async with listener, trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []
        nursery.start_soon(lambda: _accept_into(listener, accepted))
        with pytest.raises(PunchFailed) as info:
            await race.run()
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    [attempt] = info.value.attempts
    assert attempt.outcome is Outcome.HANDSHAKE_UNFINISHED
    assert "attempt 1 connected, its handshake unfinished at the deadline" in str(info.value)


async def _accept_into(listener: trio.SocketListener, accepted: list[trio.SocketStream]) -> None:
    while True:
        accepted.append(await listener.accept())


LOOPBACK6 = Endpoint("::1", 1)


async def _staggered(
    behaviour: dict[Endpoint, float | None], stagger: float = 0.25, error: OSError = REFUSED
) -> tuple[dict[Endpoint, list[float]], PunchFailed, list[Endpoint]]:
    """A dual-stack race against ``behaviour``'s candidates (in that order), each dial
    failing with ``error``; each candidate's attempt times from the start, the
    failure, and the locals dialled from."""
    attempts: dict[Endpoint, list[float]] = {}
    froms: list[Endpoint] = []
    intro, _ = introductions((), tuple(behaviour))
    dial = _fake_dial(behaviour, attempts, error)

    async def recording_dial(
        local: Endpoint, remote: Endpoint, own: object, **_: object
    ) -> trio.SocketStream:
        froms.append(local)
        return await dial(local, remote, own)

    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=1.0, pacing=0.5, stagger=stagger),
        dial=recording_dial,
        other_locals=(LOOPBACK6,),
    )
    start = trio.current_time()
    with pytest.raises(PunchFailed) as info:
        await race.run()
    times = {e: [t - start for t in ts] for e, ts in attempts.items()}
    return times, info.value, froms


async def test_ipv4_candidates_wait_the_stagger_while_ipv6_is_tried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    v4, v6 = Endpoint("192.0.2.1", 1), Endpoint("2001:db8::1", 1)
    times, failed, froms = await _staggered({v4: None, v6: None})  # v4 offered first
    assert times[v6] == [0.0]
    assert times[v4] == pytest.approx([0.25])  # RFC 8305 §5: after the stagger
    assert set(froms) == {LOOPBACK, LOOPBACK6}  # each family from its own port
    started = {a.candidate.endpoint: a.started for a in failed.attempts}  # the same as data
    assert started == {v6: 0.0, v4: pytest.approx(0.25)}


async def test_ipv4_goes_at_once_when_every_ipv6_candidate_has_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    v4, v6a, v6b = Endpoint("192.0.2.1", 1), Endpoint("2001:db8::1", 1), Endpoint("2001:db8::2", 1)
    times, _, _ = await _staggered({v4: None, v6a: 0.02, v6b: 0.05})
    assert times[v4] == pytest.approx([0.05])  # the last IPv6 refusal, not 0.25 s


async def test_ipv4_keeps_the_stagger_when_the_ipv6_4_tuple_is_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """EADDRNOTAVAIL: the peer's own connection on that IPv6 path holds the 4-tuple
    (we accepted it; it is handshaking), so the path works and IPv4 must not jump
    ahead of it (on loopback it then won 1 race in about 60)."""
    v4, v6 = Endpoint("192.0.2.1", 1), Endpoint("2001:db8::1", 1)
    taken = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    times, _, _ = await _staggered({v4: None, v6: 0.02}, error=taken)
    assert times[v4] == pytest.approx([0.25])


async def test_no_stagger_when_no_ipv6_candidate_is_dialled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    v4 = Endpoint("192.0.2.1", 1)
    times, _, froms = await _staggered({v4: None})
    assert times[v4] == [0.0]
    assert froms == [LOOPBACK]


@pytest.mark.parametrize("stagger", [0.0, 0.009, 2.5, float("nan")])
def test_a_stagger_outside_rfc_8305s_bounds_is_refused(stagger: float) -> None:
    with pytest.raises(ValueError, match="stagger"):
        PunchOptions(stagger=stagger)


async def test_a_sequential_symmetric_peer_s_next_ports_are_dialled_too(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Issue 16: the peer reported endpoint-dependent mapping with ports in sequence,
    so its next ports at its server-reflexive address are dialled beside the rest,
    once each (a dropped SYN's socket waits in SYN_SENT), past the cap of eight."""
    srflx = Endpoint("203.0.113.11", 30000)
    hosts = tuple(Endpoint(f"10.0.1.{i}", 5000) for i in range(2, 10))  # 8 more: at the cap
    facts = NatFacts(Mapping.ENDPOINT_DEPENDENT, False, Allocation.SEQUENTIAL, 1, (30000, 30002))
    intro, _ = introductions((), ())
    intro = attrs.evolve(
        intro,
        candidates=(
            Candidate(CandidateType.SERVER_REFLEXIVE, srflx),
            *(Candidate(CandidateType.HOST, h) for h in hosts),
        ),
        peer_nat=facts,
    )
    predicted = tuple(Endpoint(srflx.ip, 30002 + i) for i in range(1, PREDICTION_WINDOW + 1))
    attempts: dict[Endpoint, list[float]] = {}
    behaviour: dict[Endpoint, float | None] = dict.fromkeys((srflx, *hosts[:7]), 0)
    behaviour.update(dict.fromkeys(predicted, None))  # dropped: unanswered
    race = dialling_race(
        intro,
        Endpoint("10.0.2.2", 40000),
        options=PunchOptions(timeout=1.0),
        dial=_fake_dial(behaviour, attempts),
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert set(attempts) == {srflx, *hosts[:7], *predicted}  # the 8 selected, then 16 more
    assert all(attempts[p] == [0.0] for p in predicted)  # each once, at the introduction
    assert {a.candidate.type for a in info.value.attempts} >= {CandidateType.PREDICTED}
    # without the report, nothing is predicted
    attempts.clear()
    plain = dialling_race(
        attrs.evolve(intro, peer_nat=None),
        Endpoint("10.0.2.2", 40000),
        options=PunchOptions(timeout=1.0),
        dial=_fake_dial(behaviour, attempts),
    )
    with pytest.raises(PunchFailed):
        await plain.run()
    assert set(attempts) == {srflx, *hosts[:7]}


async def test_an_upgrade_punch_primes_each_nat_facing_candidate_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``prime_first`` (the upgrade of a relayed stream): the server-reflexive candidate's
    first SYN is a priming one, at once, and its first real dial follows 50 ms later;
    an IPv4 host candidate (no NAT between) is dialled at once, unprimed."""
    srflx, lan = Endpoint("192.0.2.1", 1), Endpoint("192.0.2.4", 4)
    intro, _ = introductions((), ())
    intro = attrs.evolve(
        intro,
        candidates=(
            Candidate(CandidateType.SERVER_REFLEXIVE, srflx),
            Candidate(CandidateType.HOST, lan),
        ),
    )
    dialled: dict[Endpoint, list[float]] = {}
    primed: list[float] = []

    def prime(local: Endpoint, remote: Endpoint, redial: reuse.Redial, own: object) -> None:
        assert remote == srflx
        primed.append(trio.current_time())

    race = dialling_race(
        intro,
        LOOPBACK,
        options=PunchOptions(timeout=0.3, pacing=0.1),
        dial=_fake_dial({srflx: None, lan: None}, dialled),
        prime=prime,
        prime_first=True,
    )
    with pytest.raises(PunchFailed) as info:
        await race.run()
    assert primed == [0.0]
    assert dialled[srflx] == [pytest.approx(0.05)]  # unanswered: the kernel retransmits
    assert dialled[lan] == [0.0]
    first = next(a for a in info.value.attempts if a.candidate.endpoint == srflx)
    assert first.outcome is Outcome.PRIMED
