"""The relay (issue 17): grants, binds, the splice, every quota, and the client's fallback."""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.testing

import punch
from punch import Endpoint, RelayLimits, Role, StreamPath
from punch._control import ControlChannel
from punch._errors import RelayRefused
from punch._protocol import (
    Bind,
    Error,
    RelayGrant,
    RendezvousConnection,
    Side,
)
from punch._relay import (
    CHUNK,
    Refused,
    Relay,
    Ticket,
    TokenBucket,
    bind,
    bind_proof,
    grant_key,
)

SECRET = secrets.token_bytes(32)
"""The grant secret of every relay these tests serve: they mint grants with it."""


@attrs.define
class Served:
    rendezvous: Endpoint
    relay: Endpoint
    state: Relay


async def _serve(nursery: trio.Nursery, limits: RelayLimits | None = None) -> Served:
    relays: list[Endpoint] = []
    state = Relay(limits or RelayLimits(), SECRET)
    rendezvous = await nursery.start(
        functools.partial(
            punch.serve_rendezvous,
            "127.0.0.1",
            0,
            relay_port=0,
            relay=state,
            relay_bound=relays,
        )
    )
    return Served(rendezvous, relays[0], state)


async def _until(done: Callable[[], bool]) -> None:
    """Return once ``done()`` holds (checked every 10 ms, at most 5 s): the relay's
    state, which another connection's bytes change."""
    with trio.fail_after(5):
        while not done():  # noqa: ASYNC110 (the relay has no event for its tables)
            await trio.sleep(0.01)


def _grant(
    served: Served, initiator: str = "alice", responder: str = "bob", expires: int | None = None
) -> RelayGrant:
    """A grant of our served relay for a new attempt."""
    expires = int(time.time()) + 60 if expires is None else expires
    ticket = Ticket(secrets.token_bytes(16), initiator, responder, expires).encode()
    return RelayGrant(served.relay, ticket, grant_key(SECRET, ticket))


async def _bind(served: Served, grant: RelayGrant, role: Role) -> trio.SocketStream:
    """A relay connection bound as ``role`` (returns once the other role is bound too)."""
    stream = await trio.open_tcp_stream(served.relay.ip, served.relay.port)
    try:
        assert await bind(stream, grant, role) == b""
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _circuit(
    served: Served, grant: RelayGrant
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """The initiator's and the responder's ends of one relayed stream."""
    ends: dict[Role, trio.SocketStream] = {}

    async def one(role: Role) -> None:
        ends[role] = await _bind(served, grant, role)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, Role.INITIATOR)
        nursery.start_soon(one, Role.RESPONDER)
    return ends[Role.INITIATOR], ends[Role.RESPONDER]


async def _refusal(served: Served, grant: RelayGrant, role: Role = Role.INITIATOR) -> str:
    """The code the relay refuses this bind with."""
    with trio.fail_after(5), pytest.raises(RelayRefused) as refused:
        await _bind(served, grant, role)
    return refused.value.code


# --- the splice --------------------------------------------------------------


async def test_two_binds_are_spliced_with_each_half_close_carried(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    a, b = await _circuit(served, _grant(served))
    await a.send_all(b"to b")
    assert await b.receive_some(100) == b"to b"
    await b.send_all(b"to a")
    assert await a.receive_some(100) == b"to a"
    await a.send_eof()
    assert await b.receive_some(100) == b""  # a's FIN, passed on
    await b.send_all(b"b still talks")
    assert await a.receive_some(100) == b"b still talks"
    await b.send_eof()
    assert await a.receive_some(100) == b""
    await a.aclose()
    await b.aclose()


async def test_an_attempt_is_relayed_once(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    grant = _grant(served)
    a, b = await _circuit(served, grant)
    for end in (a, b):
        await end.send_eof()
    assert await a.receive_some(10) == b""
    assert await b.receive_some(10) == b""
    await a.aclose()
    await b.aclose()
    attempt = Ticket.decode(grant.ticket).attempt_id
    await _until(lambda: attempt not in served.state.circuits)  # both halves gone
    assert await _refusal(served, grant) == "attempt-used"


# --- each refusal, typed --------------------------------------------------------


async def test_a_grant_of_another_relay_is_refused(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    ticket = Ticket(secrets.token_bytes(16), "alice", "bob", int(time.time()) + 60).encode()
    forged = RelayGrant(served.relay, ticket, grant_key(secrets.token_bytes(32), ticket))
    assert await _refusal(served, forged) == "bad-proof"


async def test_a_proof_for_the_other_role_is_refused(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    grant = _grant(served)
    stream = await trio.open_tcp_stream(served.relay.ip, served.relay.port)
    wrong = Bind(grant.ticket, Role.RESPONDER, bind_proof(grant.key, Role.INITIATOR))
    channel = ControlChannel(stream, stream.socket, RendezvousConnection(Side.CLIENT, relay=True))
    await channel.send(wrong)
    answer = await channel.receive()
    assert isinstance(answer, Error)
    assert answer.code == "bad-proof"
    await stream.aclose()


async def test_garbage_for_a_ticket_is_refused(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    garbage = RelayGrant(served.relay, b"\x00" * 10, secrets.token_bytes(32))
    assert await _refusal(served, garbage) == "bad-ticket"


async def test_an_expired_grant_is_refused(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    assert await _refusal(served, _grant(served, expires=int(time.time()) - 1)) == "expired"


async def test_a_role_is_bound_once(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    grant = _grant(served)
    async with trio.open_nursery() as waiting:
        await _pending(served, grant, waiting)
        assert await _refusal(served, grant) == "role-taken"
        waiting.cancel_scope.cancel()


async def test_an_unpaired_bind_times_out(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(bind_timeout=0.3))
    assert await _refusal(served, _grant(served)) == "bind-timeout"


async def test_a_connection_without_a_bind_times_out(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(bind_timeout=0.3))
    stream = await trio.open_tcp_stream(served.relay.ip, served.relay.port)
    channel = ControlChannel(stream, stream.socket, RendezvousConnection(Side.CLIENT, relay=True))
    with trio.fail_after(2):
        answer = await channel.receive()
    assert isinstance(answer, Error)
    assert answer.code == "bind-timeout"
    await stream.aclose()


async def _pending(served: Served, grant: RelayGrant, nursery: trio.Nursery) -> None:
    """Bind the initiator of ``grant`` and leave it waiting for its responder."""
    nursery.start_soon(_bind, served, grant, Role.INITIATOR)
    attempt = Ticket.decode(grant.ticket).attempt_id
    await _until(lambda: attempt in served.state.circuits)


async def test_the_relay_holds_at_most_max_circuits(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(max_circuits=1))
    async with trio.open_nursery() as waiting:
        await _pending(served, _grant(served), waiting)
        assert await _refusal(served, _grant(served, "carol", "dave")) == "relay-full"
        waiting.cancel_scope.cancel()


async def test_a_peer_holds_at_most_its_circuits(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(max_circuits_per_peer=1))
    async with trio.open_nursery() as waiting:
        await _pending(served, _grant(served, "alice", "bob"), waiting)
        assert await _refusal(served, _grant(served, "alice", "carol")) == "peer-limit"
        # another peer is not held back by alice's circuits
        await _pending(served, _grant(served, "carol", "dave"), waiting)
        waiting.cancel_scope.cancel()


async def _pour(sender: trio.SocketStream, receiver: trio.SocketStream, size: int) -> int:
    """Send ``size`` bytes; how many arrive before the relay ends the stream."""
    received = 0

    async def send() -> None:
        try:
            await sender.send_all(b"x" * size)
        except trio.BrokenResourceError:
            pass  # the relay reset us: what is measured is what arrived

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            while data := await receiver.receive_some(CHUNK):
                received += len(data)
        except trio.BrokenResourceError:
            pass
        nursery.cancel_scope.cancel()
    return received


async def test_a_stream_past_its_byte_quota_is_reset(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(max_bytes_per_circuit=100_000))
    a, b = await _circuit(served, _grant(served))
    with trio.fail_after(5):
        arrived = await _pour(a, b, 1_000_000)
    assert arrived <= 100_000
    await a.aclose()
    await b.aclose()


async def test_a_peers_hourly_bytes_reset_its_stream_and_refuse_its_next(
    nursery: trio.Nursery,
) -> None:
    served = await _serve(nursery, RelayLimits(max_bytes_per_peer_hour=100_000))
    a, b = await _circuit(served, _grant(served, "alice", "bob"))
    with trio.fail_after(5):
        assert await _pour(a, b, 1_000_000) <= 100_000
    await a.aclose()
    await b.aclose()
    assert await _refusal(served, _grant(served, "alice", "carol")) == "peer-quota"
    assert await _refusal(served, _grant(served, "carol", "bob"), Role.RESPONDER) == "peer-quota"


# --- rate, lifetime and back-pressure ------------------------------------------------


async def test_every_byte_waits_for_the_rate(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each direction's bytes pass its token bucket (whose pacing is timed below, on
    trio's clock): the sizes it was asked for add up to what was carried."""
    taken: list[int] = []
    take = TokenBucket.take

    async def counted(bucket: TokenBucket, size: int) -> None:
        taken.append(size)
        await take(bucket, size)

    monkeypatch.setattr(TokenBucket, "take", counted)
    served = await _serve(nursery, RelayLimits(rate=64 << 20))
    a, b = await _circuit(served, _grant(served))
    payload = secrets.token_bytes(300_000)
    await a.send_all(payload)
    await a.send_eof()
    received = bytearray()
    while data := await b.receive_some(CHUNK):
        received += data
    assert received == payload
    assert sum(taken) == len(payload)
    await a.aclose()
    await b.aclose()


async def test_a_stream_is_reset_at_its_lifetime(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(max_lifetime=0.2))
    a, b = await _circuit(served, _grant(served))
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):  # 5 s: only a bound
        await b.receive_some(100)  # nothing is sent: only the reset at 0.2 s ends it
    await a.aclose()
    await b.aclose()


async def test_the_payload_never_enters_the_relay(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """splice(2) moves it socket to pipe to socket: no receive_some on a relayed
    stream, so nothing for a slow reader to pile up in the process."""
    served = await _serve(nursery)
    a, b = await _circuit(served, _grant(served))
    reads: list[int] = []
    receive = trio.SocketStream.receive_some

    async def watched(stream: trio.SocketStream, max_bytes: int | None = None) -> bytes:
        data = await receive(stream, max_bytes)
        if stream.socket.getsockname()[1] == served.relay.port:
            reads.append(len(data))
        return data

    monkeypatch.setattr(trio.SocketStream, "receive_some", watched)
    await a.send_all(b"x" * 200_000)
    got = 0
    while got < 200_000:
        got += len(await b.receive_some(CHUNK))
    assert reads == []
    await a.aclose()
    await b.aclose()


async def test_a_token_bucket_paces_to_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=1000, depth=500)
    start = trio.current_time()
    for _ in range(10):
        await bucket.take(250)
    # 2500 bytes: 500 at once, the other 2000 at 1000/s
    assert trio.current_time() - start == pytest.approx(2.0)


# --- grants and tickets ------------------------------------------------------------


def test_a_ticket_round_trips_and_rejects_garbage() -> None:
    ticket = Ticket(b"a" * 16, "alice", "bob", 1_900_000_000)
    assert Ticket.decode(ticket.encode()) == ticket
    wire = ticket.encode()
    for bad in (b"", wire[:-1], wire + b"x", b"a" * 24 + b"\x05al!ce\x03bob"):
        with pytest.raises(Refused, match="bad-ticket"):
            Ticket.decode(bad)


def test_a_proof_is_bound_to_the_key_and_the_role() -> None:
    key = grant_key(b"s" * 32, b"ticket")
    assert key != grant_key(b"t" * 32, b"ticket")
    assert key != grant_key(b"s" * 32, b"ticket2")
    assert bind_proof(key, Role.INITIATOR) != bind_proof(key, Role.RESPONDER)


def test_a_relay_secret_is_at_least_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Relay(RelayLimits(), b"short")
    assert len(Relay().secret) == 32


# --- the client: relay modes through real hosts ---------------------------------


async def _pair(
    server: Endpoint, relay: str = "only", **options: object
) -> tuple[punch.PeerStream, punch.PeerStream]:
    """alice connects to bob with ``relay``; both streams."""
    async with (
        punch.open_host("alice", rendezvous=server, **options) as alice,  # type: ignore[arg-type]
        punch.open_host("bob", rendezvous=server, **options) as bob,  # type: ignore[arg-type]
        trio.open_nursery() as nursery,
    ):
        accepted: list[punch.PeerStream] = []

        async def accept() -> None:
            accepted.append(await bob.accept())

        nursery.start_soon(accept)
        to_bob = await alice.connect("bob", relay=relay)
    return to_bob, accepted[0]


async def test_relay_only_carries_an_authenticated_encrypted_stream_both_ways(
    nursery: trio.Nursery,
) -> None:
    served = await _serve(nursery)
    to_bob, to_alice = await _pair(served.rendezvous)
    assert (to_bob.path, to_alice.path) == (StreamPath.RELAYED, StreamPath.RELAYED)
    assert to_bob.remote == served.relay == to_alice.remote
    assert to_bob.encrypted
    assert to_alice.encrypted
    assert to_bob.peer_id is not None
    relayed = [a for a in to_bob.attempts if a.candidate.type is punch.CandidateType.RELAYED]
    assert [a.outcome for a in relayed] == [punch.Outcome.NOMINATED]
    assert not [a for a in to_bob.attempts if a.candidate.type is not punch.CandidateType.RELAYED]
    await to_bob.send_all(b"hello bob")
    assert await to_alice.receive_some(100) == b"hello bob"
    await to_alice.send_all(b"hello alice")
    assert await to_bob.receive_some(100) == b"hello alice"
    await to_bob.send_eof()  # TLS close_notify and a FIN, through the relay
    assert await to_alice.receive_some(100) == b""
    await to_alice.send_all(b"still open")
    assert await to_bob.receive_some(100) == b"still open"
    await to_bob.aclose()
    await to_alice.aclose()


async def test_fallback_keeps_the_direct_path_when_it_works(nursery: trio.Nursery) -> None:
    served = await _serve(nursery)
    to_bob, to_alice = await _pair(served.rendezvous, relay="fallback")
    assert (to_bob.path, to_alice.path) == (StreamPath.DIRECT, StreamPath.DIRECT)
    assert not any(a.candidate.type is punch.CandidateType.RELAYED for a in to_bob.attempts)
    await to_bob.aclose()
    await to_alice.aclose()


async def test_a_relayed_stream_carries_a_megabyte_intact(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(rate=64 << 20))
    to_bob, to_alice = await _pair(served.rendezvous, encrypt=False)
    payload = secrets.token_bytes(1 << 20)

    async def send() -> None:
        await to_bob.send_all(payload)
        await to_bob.send_eof()

    received = bytearray()
    async with trio.open_nursery() as sending:
        sending.start_soon(send)
        while data := await to_alice.receive_some():
            received += data
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    await to_bob.aclose()
    await to_alice.aclose()


async def test_relay_only_without_a_relay_fails_at_once(punch_rendezvous: Endpoint) -> None:
    async with (
        punch.open_host("alice", rendezvous=punch_rendezvous) as alice,
        punch.open_host("bob", rendezvous=punch_rendezvous),
    ):
        with trio.fail_after(2), pytest.raises(punch.PunchFailed, match="offered no relay"):
            await alice.connect("bob", relay="only")


async def test_a_refused_relay_is_a_typed_attempt_in_punch_failed(nursery: trio.Nursery) -> None:
    served = await _serve(nursery, RelayLimits(max_circuits=1))
    async with trio.open_nursery() as waiting:
        await _pending(served, _grant(served, "carol", "dave"), waiting)  # the relay is full
        async with (
            punch.open_host("alice", rendezvous=served.rendezvous, timeout=2) as alice,
            punch.open_host("bob", rendezvous=served.rendezvous, timeout=2),
        ):
            with pytest.raises(punch.PunchFailed, match="relay-full") as failed:
                await alice.connect("bob", relay="only")
        waiting.cancel_scope.cancel()
    [attempt] = failed.value.attempts
    assert attempt.candidate.type is punch.CandidateType.RELAYED
    assert attempt.outcome is punch.Outcome.RELAY_REFUSED


def test_relay_options_are_checked() -> None:
    with pytest.raises(ValueError, match="sometimes"):
        punch.PunchOptions(relay="sometimes")
    with pytest.raises(ValueError, match="relay_stagger"):
        punch.PunchOptions(relay_stagger=61)
    assert punch.PunchOptions(relay="only").relay_delay == 0.0
    assert punch.PunchOptions(relay="never").relay_delay is None
    assert punch.PunchOptions(relay_stagger=0.5).relay_delay == 0.5


async def test_a_relay_elsewhere_announced_by_the_rendezvous(nursery: trio.Nursery) -> None:
    """serve_relay alone, and a rendezvous whose grants name it (one shared secret)."""
    relays: list[Endpoint] = []
    await nursery.start(
        functools.partial(
            punch.serve_relay, ["127.0.0.1:0"], Relay(RelayLimits(), SECRET), bound=relays
        )
    )
    [elsewhere] = relays
    rendezvous = await nursery.start(
        functools.partial(
            punch.serve_rendezvous,
            "127.0.0.1",
            0,
            relay=Relay(RelayLimits(), SECRET),
            relay_at=elsewhere,
        )
    )
    to_bob, to_alice = await _pair(rendezvous)
    assert to_bob.remote == elsewhere == to_alice.remote
    assert to_bob.path is StreamPath.RELAYED
    await to_bob.send_all(b"via the relay elsewhere")
    assert await to_alice.receive_some(100) == b"via the relay elsewhere"
    await to_bob.aclose()
    await to_alice.aclose()


async def test_relay_at_needs_the_relays_secret() -> None:
    with pytest.raises(ValueError, match="relay_at needs"):
        await punch.serve_rendezvous("127.0.0.1", 0, relay_at=Endpoint("127.0.0.1", 7002))


async def test_a_responder_that_wants_the_relay_only_refuses_direct_streams(
    nursery: trio.Nursery,
) -> None:
    """bob's host says relay only: alice's direct dials are refused, and at her stagger
    both meet at the relay."""
    served = await _serve(nursery)
    async with (
        punch.open_host("alice", rendezvous=served.rendezvous, relay_stagger=0.3) as alice,
        punch.open_host("bob", rendezvous=served.rendezvous, relay="only") as bob,
        trio.open_nursery() as accepting,
    ):
        accepted: list[punch.PeerStream] = []

        async def accept() -> None:
            accepted.append(await bob.accept())

        accepting.start_soon(accept)
        to_bob = await alice.connect("bob")
    assert to_bob.path is StreamPath.RELAYED
    assert accepted[0].path is StreamPath.RELAYED
    assert to_bob.connect_time >= 0.3
    await to_bob.aclose()
    await accepted[0].aclose()
