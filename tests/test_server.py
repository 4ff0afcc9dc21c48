"""The rendezvous server's limits: hit each one and get its error code, then a close."""

from __future__ import annotations

import gc
import ipaddress
import logging
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

import punch
from punch import Endpoint
from punch._host import signed_register
from punch._protocol import (
    PROTOCOL_VERSION,
    Challenge,
    ConnectRequest,
    Error,
    Introduction,
    Keepalive,
    Registered,
)
from punch._server import (
    RendezvousServer,
    ServerLimits,
    candidate_problem,
    serve_rendezvous,
    source_key,
)
from punch.reuse import abort
from tests.helpers import (
    IDENTITY,
    TCP_ESTABLISHED,
    nonblocking_client,
    raw_client,
    refused_with,
    register,
    send_register,
    tcp_state,
)

STRICT = ServerLimits(exempt=())  # loopback counted like any other source


@asynccontextmanager
async def server(limits: ServerLimits = STRICT, **options: object) -> AsyncIterator[Endpoint]:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_rendezvous, "127.0.0.1", 0, limits=limits, **options)
        yield await nursery.start(serve)
        nursery.cancel_scope.cancel()


async def _punch(initiator: punch.Host, responder: punch.Host) -> None:
    """Punch between two hosts, check one byte crosses, close both streams."""
    async with trio.open_nursery() as nursery:
        accepted: list[punch.PeerStream] = []
        nursery.start_soon(lambda: _append(accepted, responder.accept()))
        stream = await initiator.connect(responder.name)
    async with stream, accepted[0]:
        await stream.send_all(b"x")
        assert await accepted[0].receive_some() == b"x"


async def _append(into: list[punch.PeerStream], result: Awaitable[punch.PeerStream]) -> None:
    into.append(await result)


async def test_per_ip_connection_cap_refuses_the_ninth() -> None:
    async with server() as rendezvous, AsyncExitStack() as held:
        for _ in range(8):
            await held.enter_async_context(raw_client(rendezvous, "127.0.0.3"))
        async with raw_client(rendezvous, "127.0.0.3") as ninth:
            assert await refused_with(ninth) == "too-many-connections"
        async with raw_client(rendezvous, "127.0.0.4") as other_ip:  # other sources unaffected
            assert isinstance(await register(other_ip, "x"), Registered)


async def test_exempt_sources_are_not_capped() -> None:
    limits = ServerLimits(exempt=(ipaddress.ip_network("127.0.0.5/32"),), max_connections_per_ip=1)
    async with server(limits) as rendezvous:
        async with (
            raw_client(rendezvous, "127.0.0.5") as a,
            raw_client(rendezvous, "127.0.0.5") as b,
        ):
            assert isinstance(await register(a, "a"), Registered)
            assert isinstance(await register(b, "b"), Registered)


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64, same key
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another source
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack listener's view of IPv4
        ("::1", "::/64"),
    ],
)
def test_ipv6_sources_are_counted_by_their_64(source: str, key: str) -> None:
    assert source_key(ipaddress.ip_address(source)) == key


async def test_the_server_counts_connections_under_the_source_key() -> None:
    registry = RendezvousServer(limits=STRICT)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, registry.handle, 0, host="::1"))
        rendezvous = Endpoint.from_sockaddr(listeners[0].socket.getsockname())
        async with raw_client(rendezvous, "::1") as client:
            assert isinstance(await register(client, "v6"), Registered)
            assert registry.connections == {"::/64": 1}
        nursery.cancel_scope.cancel()


async def test_a_reply_that_meets_a_reset_leaves_no_name_behind() -> None:
    """Register, then reset before the server answers: the name must be free at once."""
    registry = RendezvousServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, registry.handle, 0, host="127.0.0.1")
        )
        rendezvous = Endpoint.from_sockaddr(listeners[0].socket.getsockname())
        for _ in range(3):
            async with raw_client(rendezvous) as client:
                challenge = await client.receive()  # its handler waits for a frame
                assert isinstance(challenge, Challenge)
                register = signed_register(IDENTITY, challenge, "squatter")
                await client.stream.send_all(client.connection.send(register))
                abort(client.socket)  # the Register and an RST arrive together
                await trio.testing.wait_all_tasks_blocked()  # the handler has finished
            assert registry.peers == {}
            assert not registry.connections
        nursery.cancel_scope.cancel()


async def test_registration_timeout(slow_autojump_clock: trio.testing.MockClock) -> None:
    async with server() as rendezvous, raw_client(rendezvous) as silent:
        start = trio.current_time()
        assert await refused_with(silent) == "registration-timeout"
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.1)


async def test_a_silent_peer_is_dropped_after_45_s(
    slow_autojump_clock: trio.testing.MockClock,
) -> None:
    async with server() as rendezvous, raw_client(rendezvous) as peer:
        assert isinstance(await register(peer, "quiet"), Registered)
        await trio.sleep(40)
        await peer.send(Keepalive())  # a keepalive resets the clock
        start = trio.current_time()
        assert await refused_with(peer) == "idle-timeout"
        assert trio.current_time() - start == pytest.approx(45.0, abs=0.1)


@pytest.mark.parametrize("idle_timeout", [45.0, 10.0, 3.0])
async def test_a_host_keeps_alive_within_the_idle_timeout_it_is_told(
    slow_autojump_clock: trio.testing.MockClock, idle_timeout: float
) -> None:
    async with server(ServerLimits(exempt=(), idle_timeout=idle_timeout)) as rendezvous:
        async with punch.open_host("bob", rendezvous=rendezvous) as bob:
            await trio.sleep(300)  # far past the idle timeout: bob must still be registered
            async with punch.open_host("alice", rendezvous=rendezvous) as alice:
                await _punch(alice, bob)


@pytest.mark.parametrize("idle_timeout", [0.5, 2.999, 86400.5, True])
def test_an_idle_timeout_below_the_keepalive_floor_is_refused(idle_timeout: float) -> None:
    with pytest.raises((ValueError, TypeError), match="idle_timeout"):
        ServerLimits(idle_timeout=idle_timeout)


async def test_the_peer_cap_answers_server_full() -> None:
    async with server(ServerLimits(max_peers=2)) as rendezvous:
        async with (
            raw_client(rendezvous) as a,
            raw_client(rendezvous) as b,
            raw_client(rendezvous) as c,
        ):
            assert isinstance(await register(a, "a"), Registered)
            assert isinstance(await register(b, "b"), Registered)
            await send_register(c, "c")
            assert await refused_with(c) == "server-full"


async def test_registrations_per_ip_are_rate_limited(
    slow_autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ServerLimits(exempt=(), registrations_per_minute=3)
    async with server(limits) as rendezvous:
        for i in range(3):
            async with raw_client(rendezvous) as peer:
                assert isinstance(await register(peer, f"p{i}"), Registered)
        async with raw_client(rendezvous) as fourth:
            await send_register(fourth, "p3")
            assert await refused_with(fourth) == "rate-limited"
        await trio.sleep(60)
        async with raw_client(rendezvous) as later:
            assert isinstance(await register(later, "p4"), Registered)


async def test_introductions_per_peer_are_rate_limited() -> None:
    async with server(ServerLimits(introductions_per_minute=2)) as rendezvous:
        async with raw_client(rendezvous) as asker, raw_client(rendezvous) as target:
            await register(asker, "asker")
            await register(target, "target")
            for request_id in (1, 2):
                await asker.send(ConnectRequest("target", request_id))
                assert isinstance(await asker.receive(), Introduction)
            await asker.send(ConnectRequest("target", 3))
            reply = await asker.receive()
            assert isinstance(reply, Error)
            assert (reply.code, reply.request_id) == ("rate-limited", 3)


async def test_frames_that_arrive_in_one_segment_are_each_answered() -> None:
    """Two requests in one write: the second waits in the channel's inbox, not in the
    socket, and the server must answer it without more bytes arriving."""
    async with server() as rendezvous:
        async with raw_client(rendezvous) as asker, raw_client(rendezvous) as target:
            await register(asker, "asker")
            await register(target, "target")
            frames = [asker.connection.send(ConnectRequest("target", i)) for i in (1, 2)]
            await asker.stream.send_all(b"".join(frames))
            with trio.fail_after(5):
                answers = [await asker.receive(), await asker.receive()]
            assert [a.request_id for a in answers if isinstance(a, Introduction)] == [1, 2]


def _tasks() -> int:
    """Every task under the root task, the root included."""
    todo, count = [trio.lowlevel.current_root_task()], 0
    while todo:
        task = todo.pop()
        count += 1
        todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return count


@asynccontextmanager
async def parked_registry(
    parking: bool = True,
) -> AsyncIterator[tuple[RendezvousServer, Endpoint]]:
    """A registry on loopback; ``parking`` on, as :func:`serve_rendezvous` runs it."""
    registry = RendezvousServer(limits=STRICT)
    async with trio.open_nursery() as nursery:
        if parking:
            await nursery.start(registry.park_idle)
        serve = partial(trio.serve_tcp, registry.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        yield registry, Endpoint.from_sockaddr(listeners[0].socket.getsockname())
        nursery.cancel_scope.cancel()


async def test_registered_peers_wait_without_a_task_or_an_exception_each() -> None:
    """Idle registered peers are parked (punch._parking): however many there are, the
    server's tasks stay as many as with one, and the ``BlockingIOError`` of each last
    empty read is gone (its traceback: about 530 bytes a peer)."""
    async with parked_registry() as (registry, rendezvous):
        async with AsyncExitStack() as clients:
            first = await clients.enter_async_context(raw_client(rendezvous))
            await register(first, "p0")
            await trio.testing.wait_all_tasks_blocked()
            with_one = _tasks()
            for i in range(1, 6):
                await register(await clients.enter_async_context(raw_client(rendezvous)), f"p{i}")
            await trio.testing.wait_all_tasks_blocked()
            assert _tasks() == with_one
            assert set(registry.peers) == {f"p{i}" for i in range(6)}
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, BlockingIOError)]
            # parked, still served: a request wakes its peer
            await first.send(ConnectRequest("p5", 1))
            with trio.fail_after(5):
                assert isinstance(await first.receive(), Introduction)


async def test_without_parking_idle_peers_keep_no_exception_alive() -> None:
    """A registry that does not park serves each peer in its own task, waiting in
    ``ControlChannel.receive_idle``: the ``BlockingIOError`` of each last empty read
    (its traceback: about 530 bytes a peer) must not live as long as that wait."""
    async with parked_registry(parking=False) as (_, rendezvous):
        async with raw_client(rendezvous) as one, raw_client(rendezvous) as two:
            await register(one, "one")
            await register(two, "two")
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            alive = [
                o for o in gc.get_objects() if isinstance(o, (BlockingIOError, trio.WouldBlock))
            ]
            assert not alive


async def test_a_parked_peer_that_closes_leaves_the_registry_and_the_count() -> None:
    async with parked_registry() as (registry, rendezvous):
        async with raw_client(rendezvous) as client:
            await register(client, "leaver")
            await trio.testing.wait_all_tasks_blocked()
            assert registry.connections == {"127.0.0.1": 1}
        await trio.testing.wait_all_tasks_blocked()
        assert registry.peers == {}
        assert not registry.connections


async def test_a_parked_peer_dropped_by_the_server_leaves_at_once() -> None:
    """As when an introduction to it cannot be sent: its descriptor leaves the parking
    before it is closed, and its session ends without waiting for the idle timeout."""
    async with parked_registry() as (registry, rendezvous):
        async with raw_client(rendezvous) as client:
            await register(client, "dropped")
            await trio.testing.wait_all_tasks_blocked()
            registry._drop(registry.peers["dropped"])
            await trio.testing.wait_all_tasks_blocked()
            assert registry.peers == {}
            assert not registry.connections
            with pytest.raises(trio.BrokenResourceError):  # reset
                await client.receive()


async def test_a_token_is_required_when_set() -> None:
    async with server(ServerLimits(token="s3cret")) as rendezvous:
        for token in (None, "wrong", "s3cre"):
            async with raw_client(rendezvous) as peer:
                await send_register(peer, "p", token=token)
                assert await refused_with(peer) == "unauthorized"
        async with raw_client(rendezvous) as peer:
            assert isinstance(await register(peer, "p", token="s3cret"), Registered)
        with pytest.raises(punch.RendezvousError) as info:
            async with punch.open_host("q", rendezvous=rendezvous):
                pass
        assert info.value.code == "unauthorized"
        async with punch.open_host("q", rendezvous=rendezvous, token="s3cret") as host:
            assert host.name == "q"


async def test_an_oversized_frame_is_refused_from_its_header() -> None:
    async with server(ServerLimits(max_frame=2048)) as rendezvous, raw_client(rendezvous) as peer:
        header = struct.pack("!cBH", b"P", PROTOCOL_VERSION, 2045)  # 2049 bytes in all
        await peer.stream.send_all(header)
        assert await refused_with(peer) == "frame-too-large"


async def test_a_multicast_host_candidate_is_refused() -> None:
    async with server() as rendezvous, raw_client(rendezvous) as peer:
        await send_register(peer, "p", Endpoint("224.0.0.1", 5000))
        assert await refused_with(peer) == "bad-candidate"


@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint("0.0.0.0", 5000),
        Endpoint("::", 5000),
        Endpoint("::ffff:0.0.0.0", 5000),
        Endpoint("239.1.2.3", 5000),
        Endpoint("ff02::1", 5000),
        Endpoint("::ffff:224.0.0.1", 5000),
        Endpoint("255.255.255.255", 5000),
        Endpoint("::ffff:255.255.255.255", 5000),
        Endpoint("10.0.0.1", 0),
        Endpoint("127.0.0.1", 5000),
        Endpoint("127.9.9.9", 5000),
        Endpoint("::1", 5000),
        Endpoint("::ffff:127.0.0.1", 5000),
    ],
    ids=str,
)
def test_candidates_that_would_reflect_are_refused(endpoint: Endpoint) -> None:
    assert candidate_problem(endpoint, allow_loopback=False) is not None


@pytest.mark.parametrize(
    "endpoint",
    [Endpoint("10.0.0.1", 5000), Endpoint("2001:db8::1", 1), Endpoint("192.168.1.2", 65535)],
    ids=str,
)
def test_ordinary_candidates_are_accepted(endpoint: Endpoint) -> None:
    assert candidate_problem(endpoint, allow_loopback=False) is None


def test_loopback_candidates_are_fine_between_peers_on_the_server_host() -> None:
    assert candidate_problem(Endpoint("127.0.0.1", 5000), allow_loopback=True) is None


async def test_stop_tells_every_peer_and_returns() -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        rendezvous = await nursery.start(partial(serve_rendezvous, "127.0.0.1", 0, stop=stop))
        async with punch.open_host("bob", rendezvous=rendezvous) as bob:
            stop.set()
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # told, closed, backing off
            with trio.fail_after(5), pytest.raises(punch.RendezvousError) as info:
                await bob.connect("anyone")  # while bob reconnects: why the server went
        assert info.value.code == "shutting-down"
    with pytest.raises(OSError, match="all attempts to connect"):  # no longer accepting
        await trio.open_tcp_stream(rendezvous.ip, rendezvous.port)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_on_the_control_channel(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with server(ServerLimits(), ssl_context=server_context) as rendezvous:
        tls = {"rendezvous": rendezvous, "rendezvous_ssl_context": client_context}
        async with punch.open_host("bob", **tls) as bob, punch.open_host("alice", **tls) as alice:
            await _punch(alice, bob)
        untrusted = ssl.create_default_context()  # no CA: the cert fails
        with pytest.raises(punch.RendezvousError) as info:
            async with punch.open_host(
                "eve", rendezvous=rendezvous, rendezvous_ssl_context=untrusted
            ):
                pass
        assert info.value.code == "unreachable"
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


@settings(max_examples=60)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=600),
            st.builds(
                lambda n: struct.pack("!cBH", b"P", PROTOCOL_VERSION, n), st.integers(0, 65535)
            ),
        ),
        max_size=6,
    )
)
async def test_arbitrary_bytes_never_hurt_the_server(chunks: list[bytes]) -> None:
    async with server(ServerLimits()) as rendezvous, raw_client(rendezvous) as fuzz:
        for chunk in chunks:
            try:
                await fuzz.stream.send_all(chunk)
            except trio.BrokenResourceError:
                break
        # meanwhile, and afterwards, a well-behaved peer is served as usual
        async with raw_client(rendezvous, "127.0.0.2") as good:
            assert isinstance(await register(good, "good"), Registered)


async def _garbage(rendezvous: Endpoint) -> None:
    """One connection that sends an HTTP request instead of a frame, read until closed."""
    async with await trio.open_tcp_stream(rendezvous.ip, rendezvous.port) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
        while await stream.receive_some():
            pass


async def test_a_flood_of_garbage_is_a_few_warnings_and_a_count(
    slow_autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    async with server() as rendezvous:
        for _ in range(50):
            await _garbage(rendezvous)
        assert len(warnings()) == 5  # the first five from this source, each its own line
        assert all("protocol error" in w for w in warnings())
        await trio.sleep(61)
        await _garbage(rendezvous)
    assert len(warnings()) == 7
    assert "45 more malformed connections from 1 source(s) not logged" in warnings()[5]
    assert "(the most from 127.0.0.1: 45)" in warnings()[5]
    assert "protocol error" in warnings()[6]  # a new minute: logged again


async def test_every_server_listener_holds_a_reconnect_storm_until_it_accepts() -> None:
    """Peers reconnect in storms (after a restart, thousands within a second). The
    kernel completes their handshakes before the server accepts them, up to each
    listener's backlog (``SERVER_BACKLOG``, capped by ``net.core.somaxconn``); past
    it the SYN is dropped and the peer retries a second later. A peer's own
    listener's 128 overflowed there."""
    storm = 300
    async with trio.open_nursery() as nursery:
        probes: list[Endpoint] = []
        serve = partial(serve_rendezvous, "127.0.0.1", 0, probe_port=0, probe_bound=probes)
        rendezvous = await nursery.start(serve)
        for target in (rendezvous, probes[0]):
            clients = [nonblocking_client("127.0.0.1") for _ in range(storm)]
            try:
                for client in clients:  # no checkpoint: the server accepts none meanwhile
                    client.connect_ex(target.sockaddr())
                established = sum(tcp_state(client) == TCP_ESTABLISHED for client in clients)
            finally:
                for client in clients:
                    client.close()
            assert established == storm, target
        nursery.cancel_scope.cancel()
