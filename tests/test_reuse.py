"""Reusable sockets on loopback: one port for the listener and the dials."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from punch import Endpoint, SelfDialError, reuse, reuse_available
from punch.reuse import abort, check_not_self, dial, open_listener
from tests.helpers import (
    TCP_ESTABLISHED,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    nonblocking_client,
    open_fds,
    rto_max_ms,
    rto_min_us,
    tcp_state,
    thin_linear,
)


def test_reuse_is_available_on_linux() -> None:
    assert reuse_available() is True


async def test_listener_and_dialer_share_one_port() -> None:
    shared = open_listener(Endpoint("127.0.0.1", 0))
    port = shared.socket.getsockname()[1]
    other = open_listener(Endpoint("127.0.0.1", 0))
    async with shared, other:
        outbound = await dial(
            Endpoint("127.0.0.1", port), Endpoint.from_sockaddr(other.socket.getsockname())
        )
        accepted_there = await other.accept()
        # while the shared listener still accepts on the very same port
        inbound = await trio.open_tcp_stream("127.0.0.1", port)
        accepted_here = await shared.accept()
        assert outbound.socket.getsockname() == ("127.0.0.1", port)
        assert accepted_there.socket.getpeername() == ("127.0.0.1", port)
        assert accepted_here.socket.getsockname() == ("127.0.0.1", port)
        for stream in (outbound, accepted_there, inbound, accepted_here):
            await stream.aclose()


async def test_ipv6_listener_and_dialer_share_one_port() -> None:
    shared = open_listener(Endpoint("::1", 0))
    other = open_listener(Endpoint("::1", 0))
    async with shared, other:
        port = shared.socket.getsockname()[1]
        outbound = await dial(
            Endpoint("::1", port), Endpoint.from_sockaddr(other.socket.getsockname())
        )
        assert outbound.socket.getsockname()[:2] == ("::1", port)
        await outbound.aclose()


@pytest.mark.parametrize(
    ("remote", "own"),
    [
        (Endpoint("127.0.0.1", 5000), ()),  # our bound endpoint itself
        (
            Endpoint("203.0.113.11", 5000),
            (Endpoint("203.0.113.11", 5000),),
        ),  # our observed endpoint
    ],
)
async def test_dialing_our_own_endpoint_is_refused_before_any_syn(
    remote: Endpoint, own: tuple[Endpoint, ...]
) -> None:
    before = open_fds()
    with pytest.raises(SelfDialError, match="our own endpoint"):
        await dial(Endpoint("127.0.0.1", 5000), remote, own)
    assert open_fds() == before  # no socket was even created


def test_loopback_on_our_port_is_us_when_bound_to_any() -> None:
    with pytest.raises(SelfDialError, match="our own port"):
        check_not_self(Endpoint("127.0.0.1", 5000), Endpoint("0.0.0.0", 5000))
    check_not_self(Endpoint("127.0.0.1", 5001), Endpoint("0.0.0.0", 5000))  # another port is fine


async def test_forced_tcp_self_connect_is_detected_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Skip the check before the SYN, so the kernel really connects the socket to
    # itself (RFC 9293 simultaneous open with itself); the check after must catch it.
    monkeypatch.setattr(reuse, "check_not_self", lambda *args: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = Endpoint("127.0.0.1", port)
    before = open_fds()
    with pytest.raises(SelfDialError, match="self-connect"):
        await dial(here, here)
    assert open_fds() == before


async def test_abort_leaves_no_time_wait_so_the_same_4_tuple_dials_again() -> None:
    listener = open_listener(Endpoint("127.0.0.1", 0))
    async with listener:
        remote = Endpoint.from_sockaddr(listener.socket.getsockname())
        first = await dial(Endpoint("127.0.0.1", 0), remote)
        local = Endpoint.from_sockaddr(first.socket.getsockname())
        async with await listener.accept():
            abort(first.socket)  # we close first: a plain close would leave us in TIME_WAIT
            again = await dial(local, remote)  # EADDRNOTAVAIL if the old 4-tuple lingered
        assert again.socket.getsockname() == local.sockaddr()
        abort(again.socket)


async def test_an_existing_4_tuple_cannot_be_dialled_twice() -> None:
    listener = open_listener(Endpoint("127.0.0.1", 0))
    async with listener:
        remote = Endpoint.from_sockaddr(listener.socket.getsockname())
        first = await dial(Endpoint("127.0.0.1", 0), remote)
        local = Endpoint.from_sockaddr(first.socket.getsockname())
        with pytest.raises(OSError, match="assign requested address") as info:
            await dial(local, remote)
        assert info.value.errno == errno.EADDRNOTAVAIL
        abort(first.socket)


async def test_refused_dial_closes_its_socket() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    before = open_fds()
    with pytest.raises(ConnectionRefusedError):
        await dial(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", closed_port))
    assert open_fds() == before


async def test_a_dial_retransmits_every_second_at_most_until_it_is_given_back() -> None:
    target = open_listener(Endpoint("127.0.0.1", 0))
    async with target:
        stream = await dial(
            Endpoint("127.0.0.1", 0), Endpoint.from_sockaddr(target.socket.getsockname())
        )
        async with stream, await target.accept():
            if rto_max_ms(stream.socket) is None:
                pytest.skip("this kernel has no TCP_RTO_MAX_MS (Linux 6.15+)")
            assert rto_max_ms(stream.socket) == reuse.PUNCH_RTO_MAX_MS == 1000
            # and falls to 50 ms above the smoothed round trip (kept in jiffies: 4 ms at HZ 250)
            assert rto_min_us(stream.socket) == pytest.approx(reuse.PUNCH_RTO_MIN_US, abs=4000)
            assert thin_linear(stream.socket) == 1  # and does not double while it is thin
            reuse.restore_retransmission_timeout(stream.socket)
            assert thin_linear(stream.socket) == 0
            system = reuse._sysctl("tcp_rto_max_ms", reuse.DEFAULT_RTO_MAX_MS)
            assert rto_max_ms(stream.socket) == system != 1000
            floor = reuse._sysctl("tcp_rto_min_us", reuse.DEFAULT_RTO_MIN_US)
            assert rto_min_us(stream.socket) == pytest.approx(floor, abs=4000)
            assert floor > 100_000


class _KernelBefore615:
    """A socket as Linux before 6.15 has it: no TCP_RTO_MAX_MS or TCP_RTO_MIN_US."""

    def __init__(self) -> None:
        self.options: dict[int, int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert level == socket.IPPROTO_TCP
        if option in (reuse.TCP_RTO_MAX_MS, reuse.TCP_RTO_MIN_US):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.options[option] = value


def test_thin_stream_timeouts_do_not_wait_for_the_6_15_options() -> None:
    """Linear timeouts (Linux 2.6.34+) are set, and given back, where the 6.15-only
    bounds are refused; the SYN count stays the system's without the cap."""
    sock = _KernelBefore615()
    reuse.cap_retransmission_timeout(sock)  # type: ignore[arg-type]
    assert sock.options == {reuse.TCP_THIN_LINEAR_TIMEOUTS: 1}
    reuse.restore_retransmission_timeout(sock)  # type: ignore[arg-type]
    assert sock.options == {reuse.TCP_THIN_LINEAR_TIMEOUTS: 0}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_listener_leaves_syns_from_dropped_endpoints_unanswered(host: str) -> None:
    listener = open_listener(Endpoint(host, 0))
    target = listener.socket.getsockname()[:2]
    async with listener:
        dropped, passed = nonblocking_client(host), nonblocking_client(host)
        with dropped, passed:
            source = Endpoint.from_sockaddr(dropped.getsockname())
            other_family = Endpoint("192.0.2.1", 9) if ":" in host else Endpoint("2001:db8::1", 9)
            assert reuse.drop_syns_from(listener.socket, [source, other_family]) is True
            # loopback delivers within connect(): any SYN-ACK has arrived when it returns
            assert dropped.connect_ex(target) == errno.EINPROGRESS
            assert passed.connect_ex(target) == errno.EINPROGRESS
            assert tcp_state(dropped) == TCP_SYN_SENT  # unanswered: no SYN-ACK, no RST
            assert tcp_state(passed) == TCP_ESTABLISHED
            assert reuse.drop_syns_from(listener.socket, []) is True  # the filter goes
        # the same source endpoint, now answered
        with socket.socket(dropped.family) as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(source.sockaddr())
            again.setblocking(False)
            assert again.connect_ex(target) == errno.EINPROGRESS
            assert tcp_state(again) == TCP_ESTABLISHED


async def test_at_most_so_many_endpoints_are_dropped() -> None:
    many = [Endpoint("192.0.2.1", port) for port in range(1, reuse.MAX_DROPPED_SOURCES + 2)]
    with trio.socket.socket() as sock, pytest.raises(ValueError, match="at most 64"):
        reuse.drop_syns_from(sock, many)


async def test_an_rst_refused_socket_is_not_kept() -> None:
    """Behind an RST-answering NAT the peer's NAT has no entry and ours closed its
    own on the RST; a fresh socket is dialled next (an ICMP refusal's socket is
    kept: tests/test_redial.py)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    before = open_fds()
    redial = reuse.Redial()
    with pytest.raises(ConnectionRefusedError):
        await dial(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", closed_port), redial=redial)
    assert not redial.kept
    assert open_fds() == before


DROP_RSTS = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x04), (0x15, 0, 1, 0x04), (0x06, 0, 0, 0)]
DROP_RSTS.append((0x06, 0, 0, 0xFFFFFFFF))
"""Classic BPF: drop a segment with RST set (ldb [13]; and #4; jeq #4 -> drop), pass the rest."""


@pytest.mark.parametrize("taken_by", ["dial", "prime, then dial"])
async def test_a_kept_socket_the_peer_s_syn_met_is_left_to_finish_the_open(taken_by: str) -> None:
    """The peer's SYN can meet a socket that :class:`reuse.Redial` keeps (SYN_RECV: a
    simultaneous open under way) just before our next dial, or priming SYN, takes it.
    Both must let that open finish: disconnecting the socket would answer the peer
    with an RST, which closes both NATs' entries (the netns lab's ``cone-rst x
    cone-icmp`` cell failed about 1 trial in 25 that way)."""
    ours, peer = nonblocking_client("127.0.0.1"), nonblocking_client("127.0.0.1")
    a, b = (Endpoint.from_sockaddr(s.getsockname()) for s in (ours, peer))
    kept, deaf_peer = trio.socket.from_stdlib_socket(ours), trio.socket.from_stdlib_socket(peer)
    # No listener on b: the RST is dropped, so ours stays in SYN_SENT, as a socket does
    # whose ICMP refusal came while a call of ours held it (a soft error).
    reuse._attach_filter(kept, DROP_RSTS)
    assert ours.connect_ex(b.sockaddr()) == errno.EINPROGRESS
    assert tcp_state(ours) == TCP_SYN_SENT
    # The peer's SYN meets it; our SYN-ACK is not heard yet.
    reuse._attach_filter(deaf_peer, reuse._DROP_ALL)
    assert peer.connect_ex(a.sockaddr()) == errno.EINPROGRESS
    assert tcp_state(ours) == TCP_SYN_RECV
    redial = reuse.Redial()
    redial._keep(kept, b)
    if taken_by.startswith("prime"):
        reuse.prime(a, b, redial)
        assert redial.kept
        assert tcp_state(ours) == TCP_SYN_RECV  # no RST, no new SYN
    streams: list[trio.SocketStream] = []

    async def take() -> None:
        streams.append(await dial(a, b, redial=redial))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            assert tcp_state(ours) == TCP_SYN_RECV  # the dial waits on the open under way
            reuse._detach_filter(deaf_peer)  # a retransmission (1 s) now completes it
    async with streams[0] as stream:
        assert stream.socket is kept
        assert tcp_state(peer) == TCP_ESTABLISHED
        await stream.send_all(b"ping")
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(peer)
        assert peer.recv(4) == b"ping"
    peer.close()
