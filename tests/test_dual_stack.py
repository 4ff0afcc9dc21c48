"""IPv6 and dual stack on loopback: hosts that hold one port in both families, a
rendezvous on both, and the public reuse layer."""

from __future__ import annotations

import ipaddress
import itertools
import math
import socket
from types import SimpleNamespace

import pytest
import trio
import trio.testing

import punch
import punch._host
from punch import CandidateType, Endpoint, Identity, RendezvousError, SelfDialError
from punch._control import ControlChannel
from punch._protocol import ConnectRequest, Introduction, Registered
from tests.helpers import open_fds, raw_client, refused_with, register, send_register


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


async def _punch(caller: punch.Host, callee: punch.Host) -> tuple[punch.PeerStream, ...]:
    """``caller.connect(callee)`` while ``callee`` accepts: both ends of the stream."""
    accepted: list[punch.PeerStream] = []

    async def accept() -> None:
        accepted.append(await callee.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        stream = await caller.connect(callee.name)
    return stream, accepted[0]


async def _serve(nursery: trio.Nursery, *listen: str) -> list[Endpoint]:
    bound: list[Endpoint] = []
    await nursery.start(
        lambda task_status: punch.serve_rendezvous(
            listen=listen, bound=bound, task_status=task_status
        )
    )
    return bound


async def test_a_host_holds_one_port_number_in_both_families(nursery: trio.Nursery) -> None:
    [server] = await _serve(nursery, "127.0.0.1:0")
    async with punch.open_host("alice", rendezvous=server) as alice:
        assert [e.family for e in alice.locals] == [socket.AF_INET, socket.AF_INET6]
        assert [e.ip for e in alice.locals] == ["0.0.0.0", "::"]
        assert len({e.port for e in alice.locals}) == 1
        assert alice.local == alice.locals[0]
        assert (
            alice.host_candidates[0]
            == alice.host_candidate
            == Endpoint("127.0.0.1", alice.local.port)
        )
        # the other family's interface addresses, on the same port; never loopback
        for extra in alice.host_candidates[1:]:
            assert extra.family == socket.AF_INET6
            assert extra.port == alice.local.port
            assert not extra.address.is_loopback
            assert not extra.address.is_link_local
        assert set(alice.locals) <= alice.own_endpoints


@pytest.mark.parametrize(
    ("family", "ips"), [(socket.AF_INET, ["0.0.0.0"]), (socket.AF_INET6, ["::"])]
)
async def test_one_family_only_when_asked(
    nursery: trio.Nursery, family: socket.AddressFamily, ips: list[str]
) -> None:
    servers = await _serve(nursery, "127.0.0.1:0", "[::1]:0")
    async with punch.open_host("alice", rendezvous=servers, family=family) as alice:
        assert [e.ip for e in alice.locals] == ips
        assert alice.rendezvous.family == family  # registered in the family it holds
        assert alice.host_candidates == (alice.host_candidate,)


async def test_the_first_rendezvous_reached_is_the_one_registered_with(
    nursery: trio.Nursery,
) -> None:
    [server] = await _serve(nursery, "[::1]:0")
    with socket.socket() as closed:  # a port nobody listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        dead = Endpoint.from_sockaddr(closed.getsockname())
    async with punch.open_host("alice", rendezvous=[dead, server]) as alice:
        assert alice.rendezvous == server
        assert alice.host_candidate == Endpoint("::1", alice.local.port)
        assert alice.observed.family == socket.AF_INET6


async def test_no_rendezvous_reached_names_each_one_tried() -> None:
    dead = []
    for family, ip in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as closed:
            closed.bind((ip, 0))
            dead.append(Endpoint.from_sockaddr(closed.getsockname()))
    fds = open_fds()
    with pytest.raises(RendezvousError) as info:
        async with punch.open_host("alice", rendezvous=dead):
            pass  # pragma: no cover
    assert info.value.code == "unreachable"
    assert str(dead[0]) in str(info.value)
    assert str(dead[1]) in str(info.value)
    assert open_fds() == fds


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rendezvous": "127.0.0.1:7000", "family": socket.AF_INET6}, "no rendezvous endpoint"),
        ({"rendezvous": "127.0.0.1:7000", "local": "[::]:0"}, "no rendezvous endpoint"),
        (
            {"rendezvous": "127.0.0.1:7000", "local": "0.0.0.0:0", "family": socket.AF_INET6},
            "family",
        ),
        ({"rendezvous": "127.0.0.1:7000", "family": socket.AF_UNIX}, "family"),
        ({"rendezvous": "127.0.0.1:7000", "stagger": 5.0}, "stagger"),
    ],
)
async def test_a_family_that_cannot_work_is_refused_before_any_socket(
    kwargs: dict[str, object], match: str
) -> None:
    fds = open_fds()
    with pytest.raises(ValueError, match=match):
        async with punch.open_host("alice", **kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover
    assert open_fds() == fds


async def test_two_dual_stack_hosts_punch_over_ipv6_first(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loopback stands in for a global address: each host offers [::1]:its port.
    monkeypatch.setattr(
        punch._host,
        "interface_addresses",
        lambda family: (ipaddress.ip_address("::1"),) if family == socket.AF_INET6 else (),
    )
    [server] = await _serve(nursery, "127.0.0.1:0")
    async with (
        punch.open_host("alice", rendezvous=server) as alice,
        punch.open_host("bob", rendezvous=server) as bob,
    ):
        assert Endpoint("::1", bob.local.port) in bob.host_candidates
        stream, accepted = await _punch(alice, bob)
        assert stream.remote.family == socket.AF_INET6, "\n".join(map(repr, stream.attempts))
        assert stream.local == Endpoint("::1", alice.local.port)
        first = [a.candidate.endpoint for a in stream.attempts if a.number == 1]
        assert first[0] == Endpoint("::1", bob.local.port)  # IPv6 dialled first
        await stream.send_all(b"over IPv6")
        assert await accepted.receive_some(100) == b"over IPv6"
        await stream.aclose()
        await accepted.aclose()


async def test_a_dual_stack_rendezvous_sees_ipv4_clients_as_ipv4(nursery: trio.Nursery) -> None:
    [server] = await _serve(nursery, "[::]:0")
    assert server.ip == "::"
    v4 = Endpoint("127.0.0.1", server.port)
    async with punch.open_host("alice", rendezvous=v4, family=socket.AF_INET) as alice:
        # not ::ffff:127.0.0.1: limits, candidates and logs see the IPv4 address
        assert alice.observed == Endpoint("127.0.0.1", alice.local.port)


async def test_the_rendezvous_listens_on_every_endpoint_given(nursery: trio.Nursery) -> None:
    bound = await _serve(nursery, "127.0.0.1:0", "[::1]:0")
    assert [e.ip for e in bound] == ["127.0.0.1", "::1"]
    for server in bound:
        async with punch.open_host(f"h{server.family.value}", rendezvous=server) as host:
            assert host.observed.family == server.family


def test_an_ipv4_mapped_address_is_its_ipv4_address() -> None:
    mapped = Endpoint("::ffff:192.0.2.7", 4000)
    assert mapped == Endpoint("192.0.2.7", 4000)
    assert mapped.family == socket.AF_INET
    assert str(mapped) == "192.0.2.7:4000"
    assert Endpoint.from_sockaddr(("::ffff:203.0.113.5", 7, 0, 0)).ip == "203.0.113.5"


async def test_the_public_reuse_layer_listens_and_dials_from_one_port() -> None:
    assert punch.reuse.available()
    listener = punch.reuse.open_listener(("::1", 0))
    local = Endpoint.from_sockaddr(listener.socket.getsockname())
    with listener.socket:
        other = punch.reuse.open_listener(("::1", 0))
        remote = Endpoint.from_sockaddr(other.socket.getsockname())
        with other.socket:
            stream = await punch.reuse.dial(local, remote)  # from the listener's own port
            accepted = await other.accept()
            assert Endpoint.from_sockaddr(accepted.socket.getpeername()) == local
            await stream.aclose()
            await accepted.aclose()
        with pytest.raises(SelfDialError):
            await punch.reuse.dial(local, local)
        with pytest.raises(ValueError, match="different address families"):
            await punch.reuse.dial(local, "127.0.0.1:9")


async def test_a_dual_stack_host_registers_over_both_families(nursery: trio.Nursery) -> None:
    servers = await _serve(nursery, "127.0.0.1:0", "[::1]:0")
    async with (
        punch.open_host("alice", rendezvous=servers) as alice,
        punch.open_host("bob", rendezvous=servers) as bob,
    ):
        await alice._legs_tried.wait()
        await bob._legs_tried.wait()
        v4, v6 = Endpoint("127.0.0.1", alice.local.port), Endpoint("::1", alice.local.port)
        assert alice.server_reflexive == (v4, v6)  # one per family, as the server saw them
        stream, accepted = await _punch(bob, alice)
        offered = {a.candidate for a in stream.attempts}
        kinds = {(c.type, c.endpoint) for c in offered}
        assert (punch.CandidateType.SERVER_REFLEXIVE, v6) in kinds  # the rendezvous offered it
        assert stream.remote.family == socket.AF_INET6  # IPv6 first
        await stream.aclose()
        await accepted.aclose()


async def test_the_other_familys_registration_keeps_the_name_when_the_first_is_lost(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(punch._host, "backoff", lambda: itertools.repeat(3600.0))  # stays lost
    servers = await _serve(nursery, "127.0.0.1:0", "[::1]:0")
    async with (
        punch.open_host("alice", rendezvous=servers) as alice,
        punch.open_host("bob", rendezvous=servers) as bob,
    ):
        await alice._legs_tried.wait()
        punch.reuse.abort(alice._channel.socket)  # alice's IPv4 registration dies
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()  # her reader has seen it
        assert alice._closed is not None
        assert list(alice._legs) == [socket.AF_INET6]
        # the name is still hers over IPv6: bob reaches her, and she asks for him there
        for caller, callee in ((bob, alice), (alice, bob)):
            stream, accepted = await _punch(caller, callee)
            await stream.aclose()
            await accepted.aclose()


async def _introduced_to(asker: ControlChannel, target: str, request_id: int) -> set[Endpoint]:
    """The server-reflexive candidates the rendezvous introduces ``target`` with."""
    await asker.send(ConnectRequest(target, request_id))
    intro = await asker.receive()
    assert isinstance(intro, Introduction), intro
    return {c.endpoint for c in intro.candidates if c.type is CandidateType.SERVER_REFLEXIVE}


async def test_the_rendezvous_takes_a_second_family_of_a_name_with_its_key_only(
    nursery: trio.Nursery,
) -> None:
    [server] = await _serve(nursery, "[::]:0")
    v4, v6 = Endpoint("127.0.0.1", server.port), Endpoint("::1", server.port)
    other_key = Identity.generate()
    async with (
        raw_client(v4) as alice4,
        raw_client(v6, "::1") as alice6,
        raw_client(v4, "127.0.0.2") as alice4_again,
        raw_client(v4, "127.0.0.3") as bob,
    ):
        assert isinstance(await register(alice4, "alice"), Registered)
        assert isinstance(await register(bob, "bob", identity=other_key), Registered)
        # bob's key over IPv6: not his name to take
        async with raw_client(v6, "::1") as mallory:
            await send_register(mallory, "alice", identity=other_key)
            assert await refused_with(mallory) == "name-taken"
        # alice's key over IPv4 again: that family is held
        await send_register(alice4_again, "alice")
        assert await refused_with(alice4_again) == "name-taken"
        # alice's key over IPv6: a second registration of her name
        registered6 = await register(alice6, "alice")
        assert isinstance(registered6, Registered)
        here4 = Endpoint.from_sockaddr(alice4.socket.getsockname())
        here6 = Endpoint.from_sockaddr(alice6.socket.getsockname())
        assert await _introduced_to(bob, "alice", 1) == {here4, here6}
        # her first registration leaves: the second keeps the name, with its endpoint
        await alice4.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the server has seen it go
        assert await _introduced_to(bob, "alice", 2) == {here6}


async def _first_of(
    monkeypatch: pytest.MonkeyPatch, behaviour: dict[Endpoint, float | None]
) -> tuple[Endpoint, dict[Endpoint, float], list[Endpoint]]:
    """``_connect_first`` over ``behaviour``'s servers (seconds to connect, negative:
    to fail, None: never): the server kept, when each connect started, and the
    connects given up (cancelled, or closed once connected)."""
    started: dict[Endpoint, float] = {}
    closed: list[Endpoint] = []

    async def connect(local: Endpoint, server: Endpoint, *_: object) -> SimpleNamespace:
        started[server] = trio.current_time()
        delay = behaviour[server]
        try:
            await trio.sleep(math.inf if delay is None else abs(delay))
        except trio.Cancelled:
            closed.append(server)
            raise
        assert delay is not None
        if delay < 0:
            raise RendezvousError("unreachable", f"cannot reach the rendezvous at {server}")
        return SimpleNamespace(socket=server)

    monkeypatch.setattr(punch._host, "connect_control", connect)
    monkeypatch.setattr(punch.reuse, "abort", closed.append)
    locals_ = (Endpoint("0.0.0.0", 4000), Endpoint("::", 4000))
    registration = punch._host._Registration(
        "alice", Identity.generate(), locals_, tuple(behaviour), 10.0, None, None, None
    )
    routes = [(next(e for e in locals_ if e.family == s.family), s) for s in behaviour]
    start = trio.current_time()
    _, server = await registration._connect_first(routes)
    return server, {s: t - start for s, t in started.items()}, closed


V6_SERVER, V4_SERVER = Endpoint("2001:db8::10", 7000), Endpoint("203.0.113.10", 7000)


async def test_a_black_holed_rendezvous_family_costs_the_stagger_not_the_timeout(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, started, _ = await _first_of(monkeypatch, {V6_SERVER: None, V4_SERVER: 0.01})
    assert server == V4_SERVER
    assert started == {V6_SERVER: 0.0, V4_SERVER: punch._host.CONTROL_STAGGER}
    assert trio.current_time() == pytest.approx(punch._host.CONTROL_STAGGER + 0.01)


async def test_a_refused_rendezvous_family_hands_over_at_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, started, _ = await _first_of(monkeypatch, {V6_SERVER: -0.05, V4_SERVER: 0.01})
    assert server == V4_SERVER
    assert started[V4_SERVER] == pytest.approx(0.05)


async def test_the_first_rendezvous_to_connect_is_kept_and_the_later_one_closed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first is slow but not lost: IPv4 starts after the stagger and finishes first
    server, _, closed = await _first_of(monkeypatch, {V6_SERVER: 0.3, V4_SERVER: 0.02})
    assert server == V4_SERVER
    assert closed == [V6_SERVER]  # given up
    server, _, closed = await _first_of(monkeypatch, {V6_SERVER: 0.26, V4_SERVER: 0.02})
    assert server == V6_SERVER  # done at 0.26, before IPv4's 0.25 + 0.02
    assert closed == [V4_SERVER]
    # both done at the same instant (0.375 s): one is kept, the other given up
    server, _, closed = await _first_of(monkeypatch, {V6_SERVER: 0.375, V4_SERVER: 0.125})
    assert closed == [V4_SERVER if server == V6_SERVER else V6_SERVER]
