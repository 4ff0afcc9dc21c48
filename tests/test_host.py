"""Loopback integration: a real rendezvous server and real hosts in one trio run."""

from __future__ import annotations

import functools
import itertools
import random
import ssl
import struct
import threading

import pytest
import trio
import trio.testing

import punch
import punch._server
from punch import Endpoint, RendezvousError, ReuseUnavailable, Role, WonBy
from punch._control import ControlChannel
from punch._host import BACKOFF_FIRST, BACKOFF_MAX, backoff
from punch._protocol import (
    PROTOCOL_VERSION,
    Challenge,
    Error,
    RendezvousConnection,
    Side,
)
from tests.helpers import introductions, open_fds, register


@pytest.fixture
async def rendezvous(nursery: trio.Nursery) -> Endpoint:
    bound: Endpoint = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
    return bound


async def _exchange(a: punch.PeerStream, b: punch.PeerStream) -> None:
    await a.send_all(b"from " + a.peer_name.encode())
    await b.send_all(b"from " + b.peer_name.encode())
    assert await b.receive_some(100) == b"from " + a.peer_name.encode()
    assert await a.receive_some(100) == b"from " + b.peer_name.encode()


async def test_two_hosts_punch_and_talk_both_ways(rendezvous: Endpoint) -> None:
    async with (
        punch.open_host("alice", rendezvous=rendezvous) as alice,
        punch.open_host("bob", rendezvous=rendezvous) as bob,
    ):
        assert alice.observed.ip == "127.0.0.1"
        assert alice.observed.port == alice.local.port
        async with trio.open_nursery() as nursery:
            accepted: list[punch.PeerStream] = []

            async def accept() -> None:
                accepted.append(await bob.accept())

            nursery.start_soon(accept)
            to_bob = await alice.connect("bob")
        [to_alice] = accepted
        assert (to_bob.role, to_alice.role) == (Role.INITIATOR, Role.RESPONDER)
        assert (to_bob.peer_name, to_alice.peer_name) == ("bob", "alice")
        assert (to_bob.local, to_bob.remote) == (to_alice.remote, to_alice.local)
        assert to_bob.local.port == alice.local.port  # dialled and accepted on the host's one port
        assert to_alice.local.port == bob.local.port
        assert {to_bob.won_by, to_alice.won_by} <= set(WonBy)
        assert 0 < to_bob.connect_time < 10
        await _exchange(to_bob, to_alice)
        await to_bob.send_eof()
        assert await to_alice.receive_some(10) == b""  # half-close works
        await to_alice.send_all(b"still open")
        assert await to_bob.receive_some(100) == b"still open"
        await to_bob.aclose()
        await to_alice.aclose()


async def test_punch_connect_is_one_call(rendezvous: Endpoint) -> None:
    async with punch.open_host("bob", rendezvous=rendezvous) as bob, trio.open_nursery() as nursery:
        accepted: list[punch.PeerStream] = []

        async def accept() -> None:
            accepted.append(await bob.accept())

        nursery.start_soon(accept)
        stream = await punch.connect("bob", rendezvous=str(rendezvous), name="alice", timeout=5.0)
    assert stream.role is Role.INITIATOR
    await _exchange(stream, accepted[0])
    await stream.aclose()
    await accepted[0].aclose()


async def test_one_host_holds_several_peers_on_one_port(rendezvous: Endpoint) -> None:
    names = ["bob", "carol", "dave"]
    async with punch.open_host("alice", rendezvous=rendezvous) as alice:
        async with trio.open_nursery() as nursery:
            peers: dict[str, punch.PeerStream] = {}
            hosts = {}
            for name in names:
                hosts[name] = await nursery.start(_serve_one, name, rendezvous, peers)
            streams = {}

            async def dial(name: str) -> None:
                streams[name] = await alice.connect(name)

            async with trio.open_nursery() as dials:
                for name in names:
                    dials.start_soon(dial, name)
            for name in names:
                assert streams[name].local.port == alice.local.port
                assert streams[name].attempt_id != b""
                await streams[name].send_all(name.encode())
                assert await streams[name].receive_some(100) == name.encode()
                await streams[name].aclose()
            nursery.cancel_scope.cancel()


async def _serve_one(
    name: str,
    rendezvous: Endpoint,
    peers: dict[str, punch.PeerStream],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """A host that echoes one message back to the first peer that punches in."""
    async with punch.open_host(name, rendezvous=rendezvous) as host:
        task_status.started()
        stream = await host.accept()
        async with stream:
            await stream.send_all(await stream.receive_some(100))
            await trio.sleep_forever()


@pytest.mark.parametrize("encrypt", [True, False])
async def test_a_host_builds_its_tls_contexts_off_the_trio_thread_as_it_opens(
    rendezvous: Endpoint, monkeypatch: pytest.MonkeyPatch, encrypt: bool
) -> None:
    """No punch pays the 3-7 ms of a first TLS context: an encrypting host has a worker
    thread build both sides' as it opens, and a punch then only adds the peer's
    certificate; a plaintext host builds none."""
    built: list[tuple[bool, int]] = []
    new_context = punch.Identity._new_context

    def counting(self: punch.Identity, server_side: bool) -> ssl.SSLContext:
        built.append((server_side, threading.get_ident()))
        return new_context(self, server_side)

    monkeypatch.setattr(punch.Identity, "_new_context", counting)
    identity, peer = punch.Identity.generate(), punch.Identity.generate()
    async with punch.open_host("alice", rendezvous=rendezvous, identity=identity, encrypt=encrypt):
        await trio.testing.wait_all_tasks_blocked()
    if not encrypt:
        assert built == []
        return
    for server_side in (False, True):  # waits for the worker, if it is still building
        identity.tls_context(peer.certificate, server_side=server_side)
    assert sorted(side for side, _ in built) == [False, True]
    assert threading.get_ident() not in {thread for _, thread in built}


async def test_unknown_and_same_peer_are_refused(rendezvous: Endpoint) -> None:
    async with punch.open_host("alice", rendezvous=rendezvous) as alice:
        with pytest.raises(RendezvousError) as info:
            await alice.connect("nobody")
        assert info.value.code == "unknown-peer"
        with pytest.raises(RendezvousError) as info:
            await alice.connect("alice")
        assert info.value.code == "same-peer"


async def test_a_held_name_is_refused(rendezvous: Endpoint) -> None:
    async with punch.open_host("alice", rendezvous=rendezvous):
        with pytest.raises(RendezvousError) as info:
            async with punch.open_host("alice", rendezvous=rendezvous):
                pass  # pragma: no cover
        assert info.value.code == "name-taken"
    async with punch.open_host("alice", rendezvous=rendezvous):  # free again once its holder left
        pass


async def test_unreachable_rendezvous() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed = Endpoint.from_sockaddr(probe.getsockname())
    with pytest.raises(RendezvousError) as info:
        async with punch.open_host("alice", rendezvous=closed):
            pass  # pragma: no cover
    assert info.value.code == "unreachable"
    assert str(closed) in str(info.value)


async def test_a_malformed_frame_closes_only_that_connection(rendezvous: Endpoint) -> None:
    async with (
        punch.open_host("alice", rendezvous=rendezvous) as alice,
        punch.open_host("bob", rendezvous=rendezvous) as bob,
    ):
        for garbage in (
            b"GET / HTTP/1.1\r\n\r\n",
            struct.pack("!cBH", b"P", PROTOCOL_VERSION, 5000),
            struct.pack("!cBH", b"P", PROTOCOL_VERSION, 2) + b"{}",
        ):
            async with await trio.open_tcp_stream(rendezvous.ip, rendezvous.port) as raw:
                await raw.send_all(garbage)
                with trio.fail_after(5):
                    reply = await _read_all(raw)
                challenge, error = RendezvousConnection(Side.CLIENT).receive_data(reply)
                assert isinstance(challenge, Challenge)
                assert isinstance(error, Error)
                assert error.code in {"protocol-error", "frame-too-large"}
        # the server and every other peer carry on
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept_and_close, bob)
            stream = await alice.connect("bob")
            await stream.aclose()


async def _accept_and_close(host: punch.Host) -> None:
    await (await host.accept()).aclose()


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(4096):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_registration_must_come_in_time(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        lambda task_status: punch.serve_rendezvous(
            "127.0.0.1", 0, registration_timeout=0.2, task_status=task_status
        )
    )
    async with await trio.open_tcp_stream(server.ip, server.port) as idle:
        with trio.fail_after(5):
            reply = await _read_all(idle)  # sends nothing; is told why and closed
    challenge, error = RendezvousConnection(Side.CLIENT).receive_data(reply)
    assert isinstance(challenge, Challenge)
    assert error == Error("registration-timeout", "no Register in time")


async def _serve(
    scope: trio.CancelScope, port: int, *, task_status: trio.TaskStatus[Endpoint]
) -> None:
    """A rendezvous on 127.0.0.1:``port`` until ``scope`` is cancelled (it "dies")."""
    with scope:
        await punch.serve_rendezvous("127.0.0.1", port, task_status=task_status)


async def test_a_host_outlives_its_rendezvous_and_registers_again(
    nursery: trio.Nursery, slow_autojump_clock: trio.testing.MockClock
) -> None:
    first_life = trio.CancelScope()
    rendezvous = await nursery.start(_serve, first_life, 0)
    async with punch.open_host("alice", rendezvous=rendezvous) as alice:
        accepted: list[punch.PeerStream] = []

        async def accept() -> None:
            accepted.append(await alice.accept())  # one call, across the outage

        nursery.start_soon(accept)
        first_life.cancel()  # the rendezvous dies
        with trio.fail_after(5):
            with pytest.raises(RendezvousError) as info:
                await alice.connect("bob")  # a clear error at once, not a hang
        assert info.value.code == "closed"
        await nursery.start(_serve, trio.CancelScope(), rendezvous.port)  # it restarts
        with trio.fail_after(BACKOFF_FIRST + 1):  # the first retry comes within 0.5 s
            await alice.wait_registered()
        async with punch.open_host("bob", rendezvous=rendezvous) as bob:
            async with await bob.connect("alice") as stream:
                await stream.send_all(b"x")
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        [kept] = accepted
        assert kept.peer_name == "bob"
        assert await kept.receive_some() == b"x"
        await kept.aclose()


def test_the_backoff_doubles_to_its_cap_with_jitter() -> None:
    delays = list(itertools.islice(backoff(random.Random(7)), 10))
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert all(cap / 2 <= delay <= cap for delay, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)  # jittered: no two hosts in step
    assert caps[0] == BACKOFF_FIRST
    assert caps[-1] == BACKOFF_MAX


async def test_bad_arguments_are_refused_up_front(rendezvous: Endpoint) -> None:
    with pytest.raises(ValueError, match="name"):
        async with punch.open_host("not ok", rendezvous=rendezvous):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="timeout"):
        async with punch.open_host("alice", rendezvous=rendezvous, timeout=0):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="IP:PORT"):
        async with punch.open_host("alice", rendezvous="localhost"):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="rendezvous"):
        async with punch.open_host("alice", rendezvous=7000):  # type: ignore[arg-type]
            pass  # pragma: no cover
    async with punch.open_host("alice", rendezvous=rendezvous) as alice:
        with pytest.raises(ValueError, match="name"):
            await alice.connect("")
        with pytest.raises(ValueError, match="timeout"):
            await alice.connect("bob", timeout=-1)


async def test_reuse_unavailable_is_a_typed_error(
    rendezvous: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(punch.reuse, "reuse_available", lambda: False)
    with pytest.raises(ReuseUnavailable):
        async with punch.open_host("alice", rendezvous=rendezvous):
            pass  # pragma: no cover


async def test_repeated_punches_leak_no_file_descriptors(rendezvous: Endpoint) -> None:
    async with punch.open_host("bob", rendezvous=rendezvous) as bob, trio.open_nursery() as nursery:

        async def echo_forever() -> None:
            while True:
                stream = await bob.accept()
                await stream.aclose()

        nursery.start_soon(echo_forever)
        baseline = None
        for round_ in range(12):
            stream = await punch.connect("bob", rendezvous=rendezvous, name="alice")
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked(0.01)  # bob's race has ended too
            if round_ == 1:  # after warm-up
                baseline = open_fds()
        assert open_fds() == baseline
        nursery.cancel_scope.cancel()


async def test_a_peer_that_never_punches_gives_punch_failed_naming_each_candidate(
    rendezvous: Endpoint,
) -> None:
    # "bob" registers by hand and then does nothing: every SYN to him is refused.
    async with await trio.open_tcp_stream(rendezvous.ip, rendezvous.port) as raw:
        bob = ControlChannel(raw, raw.socket, RendezvousConnection(Side.CLIENT))
        registered = await register(bob, "bob", Endpoint("127.0.0.2", 9))
        async with punch.open_host("alice", rendezvous=rendezvous, timeout=0.5) as alice:
            with pytest.raises(punch.PunchFailed) as info:
                await alice.connect("bob")
            # bob got his half of the introduction, naming alice's endpoints
            intro = await bob.receive()
        assert isinstance(intro, punch._protocol.Introduction)
        assert (intro.role, intro.peer_name) == (Role.RESPONDER, "alice")
        assert intro.candidates[0] == punch.Candidate(
            punch.CandidateType.SERVER_REFLEXIVE, alice.observed
        )
    assert registered is not None
    failures = info.value.__cause__
    assert isinstance(failures, ExceptionGroup)
    tried = {str(e.candidate) for e in failures.exceptions}
    assert tried == {f"srflx {registered.observed}", "host 127.0.0.2:9"}  # type: ignore[union-attr]
    for failure in failures.exceptions:
        assert failure.attempts >= 2  # paced retries, not one try
        assert isinstance(failure.__cause__, ConnectionRefusedError)


async def test_accept_raises_an_inbound_punch_that_failed(rendezvous: Endpoint) -> None:
    async with punch.open_host("bob", rendezvous=rendezvous, timeout=0.5) as bob:
        # "alice" asks for bob by hand and then never punches back
        async with await trio.open_tcp_stream(rendezvous.ip, rendezvous.port) as raw:
            alice = ControlChannel(raw, raw.socket, RendezvousConnection(Side.CLIENT))
            await register(alice, "alice")
            await alice.send(punch._protocol.ConnectRequest("bob", 1))
            with trio.fail_after(5), pytest.raises(punch.PunchFailed, match="alice"):
                await bob.accept()


async def _answers(endpoint: Endpoint) -> bool:
    """Whether a TCP connect to ``endpoint`` completes: something listens there."""
    try:
        stream = await trio.open_tcp_stream(endpoint.ip, endpoint.port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def test_a_host_listens_only_while_a_punch_is_pending(rendezvous: Endpoint) -> None:
    # Between punches nothing of ours listens, so SO_REUSEPORT cannot hand us
    # connections meant for another same-user process on the port, nor the reverse.
    async with punch.open_host(
        "bob", rendezvous=rendezvous, local="127.0.0.1:0", timeout=1.0
    ) as bob:
        assert not await _answers(bob.local)  # registered and idle
        async with await trio.open_tcp_stream(rendezvous.ip, rendezvous.port) as raw:
            alice = ControlChannel(raw, raw.socket, RendezvousConnection(Side.CLIENT))
            await register(alice, "alice")
            await alice.send(punch._protocol.ConnectRequest("bob", 1))
            assert isinstance(await alice.receive(), punch._protocol.Introduction)
            await trio.testing.wait_all_tasks_blocked(0.01)  # bob has read his half too
            assert await _answers(bob.local)  # punching: listening
            with trio.fail_after(5), pytest.raises(punch.PunchFailed):
                await bob.accept()  # alice never punches back
        assert not await _answers(bob.local)  # the punch is over: closed again


async def test_a_thousand_cancelled_connects_leak_no_descriptor(nursery: trio.Nursery) -> None:
    limits = punch._server.ServerLimits(introductions_per_minute=10_000)
    rendezvous = await nursery.start(
        functools.partial(punch.serve_rendezvous, "127.0.0.1", 0, limits=limits)
    )
    outcomes = {"cancelled": 0, "connected": 0}
    async with punch.open_host("alice", rendezvous=rendezvous) as alice:
        baseline = open_fds()
        async with punch.open_host("bob", rendezvous=rendezvous, timeout=0.5) as bob:

            async def drain_bob() -> None:
                while True:
                    try:
                        await (await bob.accept()).aclose()
                    except RendezvousError:  # bob is closing
                        return
                    except OSError:  # an inbound punch alice walked away from
                        pass

            async with trio.open_nursery() as drains:
                drains.start_soon(drain_bob)
                for i in range(1000):
                    # 0 to 4.75 ms: before the request, awaiting the introduction, mid-race, after
                    with trio.move_on_after((i % 20) * 0.00025) as scope:
                        await (await alice.connect("bob")).aclose()
                    outcomes["cancelled" if scope.cancelled_caught else "connected"] += 1
                drains.cancel_scope.cancel()
        # bob, his races and his sockets are gone; once alice's listener has seen the
        # resets of what bob had in flight to her, she must be back where she started
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        assert open_fds() == baseline, outcomes
    # enough cancellations to cover every phase (480 of 1000 on a loaded 2-core
    # machine, about 600 idle: how many connects finish within 4.75 ms varies)
    assert outcomes["cancelled"] > 250, outcomes


async def test_an_inbound_outcome_that_comes_as_the_host_closes_is_dropped(
    rendezvous: Endpoint, autojump_clock: trio.testing.MockClock
) -> None:
    # A responder race that ends with no checkpoint left after the host was cancelled
    # reaches the accept queue after open_host closed it: its outcome is dropped,
    # not raised out of open_host.
    intro, _ = introductions((), ())
    async with punch.open_host("bob", rendezvous=rendezvous, timeout=0.5) as bob:
        bob._close_unaccepted()  # what open_host's exit does
        bob._router.open_route(intro.attempt_id)
        await bob._respond(intro)  # no candidates: PunchFailed after 0.5 s, then dropped
        with pytest.raises(RendezvousError, match="closed"):
            await bob.accept()
