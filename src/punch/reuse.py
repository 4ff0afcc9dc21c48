"""Reusable TCP sockets for trio: one local ip:port for a listener and every dial.

TCP names a connection by its 4-tuple (RFC 9293 §3.4), so a listener, the
rendezvous control connection and one socket per outbound attempt can all be
bound to the same local endpoint, provided each sets ``SO_REUSEADDR`` and
``SO_REUSEPORT`` before ``bind`` (socket(7)). What go-reuseport offers Go
programs, this module offers trio programs that punch their own protocols;
:class:`punch.Host` is built on it. Both families: an IPv6 socket is
``IPV6_V6ONLY`` (ipv6(7)), so one port number can be held on IPv4 and on IPv6
by separate sockets::

    listener = punch.reuse.open_listener(("0.0.0.0", 40000))
    stream = await punch.reuse.dial(("0.0.0.0", 40000), ("203.0.113.12", 40000))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable

import trio

from ._endpoint import Endpoint, as_endpoint
from ._errors import ReuseUnavailable, SelfDialError
from ._outcome import REFUSALS

__all__ = [
    "Redial",
    "abort",
    "available",
    "bind_reusable",
    "check_not_self",
    "dial",
    "drop_syns_from",
    "open_listener",
    "prime",
]

_EndpointLike = Endpoint | tuple[str, int] | str

log = logging.getLogger("punch.reuse")

LISTEN_BACKLOG = 128
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def _set_reuse(sock: socket.socket | trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except (AttributeError, OSError) as exc:
        raise ReuseUnavailable(f"cannot set SO_REUSEADDR + SO_REUSEPORT: {exc}") from exc


@functools.cache
def reuse_available() -> bool:
    """Whether this OS lets a listener and a dialer share one TCP ip:port.

    Probes once, on 127.0.0.1, by binding two sockets with ``SO_REUSEADDR`` and
    ``SO_REUSEPORT`` to one port while the first listens; the answer is cached
    for the life of the process.

    Returns:
        ``True`` when punch can work here.
    """
    try:
        with socket.socket() as first, socket.socket() as second:
            _set_reuse(first)
            _set_reuse(second)
            first.bind(("127.0.0.1", 0))
            first.listen(1)
            second.bind(first.getsockname())
    except OSError as exc:
        log.info("address reuse unavailable: %s", exc)
        return False
    return True


available = reuse_available


def bind_reusable(local: _EndpointLike) -> trio.socket.SocketType:
    """A new TCP socket with both reuse options set, bound to ``local``.

    Synchronous: ``local`` is a numeric address, so ``bind`` never blocks.
    An IPv6 socket is ``IPV6_V6ONLY`` (ipv6(7)): it never takes IPv4 traffic,
    so the same port number can be bound on IPv4 by another socket.

    Args:
        local: the endpoint to bind (:class:`~punch.Endpoint`, ``(ip, port)``
            or ``"ip:port"``); port 0 lets the kernel choose.

    Raises:
        TypeError, ValueError: ``local`` is not an endpoint.
        ReuseUnavailable: the options cannot be set on this OS.
        OSError: ``bind`` failed (``EADDRINUSE`` when a socket without the
            options, or of another user, holds the port; ``EAFNOSUPPORT`` or
            ``EADDRNOTAVAIL`` where the family or address is not available).
    """
    local = as_endpoint(local, "local")
    sock = socket.socket(local.family, socket.SOCK_STREAM)
    try:
        _set_reuse(sock)
        if local.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(local.sockaddr())
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
"""ip(7) option number (Linux 4.2+); Python's socket module lacks it."""


def _bind_new_port(local: Endpoint) -> trio.socket.SocketType:
    """A new TCP socket bound to ``local``'s address, its port left to ``connect``: one
    free for the 4-tuple, from ``ip_local_port_range`` (ip(7)
    ``IP_BIND_ADDRESS_NO_PORT``), shared with nothing (no reuse options)."""
    sock = socket.socket(local.family, socket.SOCK_STREAM)
    try:
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # not Linux: bind picks the port
        sock.bind(Endpoint(local.ip, 0).sockaddr())
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def open_listener(local: _EndpointLike, backlog: int = LISTEN_BACKLOG) -> trio.SocketListener:
    """A listening socket on ``local`` that dials on the same port can share.

    Args:
        local: as :func:`bind_reusable`.
        backlog: connections the kernel completes before they are accepted
            (listen(2); capped at ``net.core.somaxconn``); default
            :data:`LISTEN_BACKLOG` (128), for a peer's own listener.

    Raises:
        TypeError, ValueError, ReuseUnavailable, OSError: as :func:`bind_reusable`.
    """
    sock = bind_reusable(local)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)
"""The option number (include/uapi/linux/tcp.h, Linux 6.15+); Python's socket module lacks it."""
PUNCH_RTO_MAX_MS = 1000
"""Milliseconds a punch socket's retransmission timeout may grow to while the punch lasts."""
DEFAULT_RTO_MAX_MS = 120_000
"""Linux's own bound (``TCP_RTO_MAX``), where ``net.ipv4.tcp_rto_max_ms`` cannot be read."""
PUNCH_SYN_RETRIES = 127
"""``TCP_SYNCNT`` (tcp(7); its maximum) of a capped socket: the caller's deadline ends it."""
TCP_RTO_MIN_US = getattr(socket, "TCP_RTO_MIN_US", 45)
"""The option number (include/uapi/linux/tcp.h, Linux 6.15+); Python's socket module lacks it."""
PUNCH_RTO_MIN_US = 50_000
"""Microseconds above the smoothed round trip a punch socket's retransmission
timeout may fall to (Linux's own floor, ``net.ipv4.tcp_rto_min_us``, is 200 ms;
RFC 6298 §2.4 asks for 1 s, which no stack uses): see
:func:`cap_retransmission_timeout`."""
DEFAULT_RTO_MIN_US = 200_000
"""Linux's own floor (``TCP_RTO_MIN``), where ``net.ipv4.tcp_rto_min_us`` cannot be read."""
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)
"""The option number (include/uapi/linux/tcp.h, Linux 2.6.34+; tcp(7)); Python lacks it."""


def cap_retransmission_timeout(sock: trio.socket.SocketType) -> None:
    """Retransmit at least every second while a punch lasts (``TCP_RTO_MAX_MS`` 1000),
    and from 50 ms past the round trip on (``TCP_RTO_MIN_US``); also for the life of a
    control connection, whose few small frames a punch waits on.

    Under loss a punch rests on retransmissions: our SYNs, the SYN-ACK of a
    simultaneous open, the handshake's few small messages. Linux backs them off
    (1, 3, 7 s for a SYN-ACK; data after a retransmitted SYN starts at the 3 s
    fallback of RFC 6298 §5.7), so with 20% loss on each WAN link one lost
    message could outlast the 10 s deadline. Capped, each is tried again every
    second at most (the initial RTO of RFC 6298 §2.1). The kept stream stays
    capped through TLS until the peer's first application bytes arrive (only
    then has every handshake message of ours arrived), then gets the system's
    bound back (:func:`restore_retransmission_timeout`); losers are aborted.
    The bounds need Linux 6.15 or later; elsewhere only the thin-stream mode
    (below) is set. Never raises.

    Capped, the default ``tcp_syn_retries`` of 6 (tcp(7)) would abandon a SYN,
    or a simultaneous open's SYN-ACK, after 7 s (``ETIMEDOUT``), before the
    punch's or the registration's deadline; so the count goes up too, to
    :data:`PUNCH_SYN_RETRIES`, and the caller's deadline ends the connect. In
    the 20% loss cell a peer's half-open dial gave up at 7 s while the other
    side held the connection (2 trials in 20 failed so, none with the count
    raised), and a registration failed at 7 s of its 10.

    The floor goes down too, to :data:`PUNCH_RTO_MIN_US` (``TCP_RTO_MIN_US``,
    Linux 6.15+): Linux retransmits no sooner than 200 ms past the smoothed
    round trip, so on a 50 ms path each lost handshake message cost 250 ms,
    then 500, then 1000; from 50 ms past it, 100, 200, 400. The netns lab's
    20% loss cell (cone x cone, 50 ms round trips, 20 trials a run): 17/20
    within 10 s, median 6.2 s, with the system's floor; with 50 ms, 18 or more
    within 10 s in each of two runs (19/20 and 20/20 connected), medians 5.5
    and 5.7 s; the 10% loss cell 20/20, median 1.07 s (1.68 s in the last
    sweep before).
    The kept stream gets the system's floor back with its bound.

    And the timeouts stop doubling (``TCP_THIN_LINEAR_TIMEOUTS``, tcp(7),
    Linux's "thin stream" mode): while fewer than 4 segments are in flight
    on an established connection, its first 6 retransmissions each come one
    RTO after the last, not twice as late. A punch's and a registration's
    messages are such a stream: one small frame, then a wait for the answer.
    SYNs are not covered (``net.ipv4.tcp_syn_linear_timeouts`` is Linux's
    knob for those). The netns lab's 20% loss cell, trials connected within
    10 s per 20: 19, 18 and 19 in three rounds run side by side with the code
    before (15, 16 and 15); but 15 in the full sweep after (the sweep before,
    without it: 18). From the introduction to the stream, the 90th
    percentile fell in each side-by-side round: 5.5, 6.4 and 5.4 s, against
    9.7, 7.4 and 6.6 s.
    """
    # an older kernel (ENOPROTOOPT), or another OS: its backoff outlasts 7 s
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, PUNCH_RTO_MAX_MS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, PUNCH_SYN_RETRIES)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, PUNCH_RTO_MIN_US)
    with contextlib.suppress(OSError):  # Linux 2.6.34+: set also where the above are not
        sock.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)


def restore_retransmission_timeout(sock: trio.socket.SocketType) -> None:
    """Undo :func:`cap_retransmission_timeout`: the system's bounds again. Never raises."""
    with contextlib.suppress(OSError):
        sock.setsockopt(
            socket.IPPROTO_TCP, TCP_RTO_MAX_MS, _sysctl("tcp_rto_max_ms", DEFAULT_RTO_MAX_MS)
        )
        sock.setsockopt(
            socket.IPPROTO_TCP, TCP_RTO_MIN_US, _sysctl("tcp_rto_min_us", DEFAULT_RTO_MIN_US)
        )
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 0)  # the sysctl's again


@functools.cache
def _sysctl(name: str, default: int) -> int:
    """``net.ipv4.<name>`` as an int, or ``default`` where it cannot be read."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as sysctl:
            return int(sysctl.read())
    except (OSError, ValueError):
        return default


def check_not_self(remote: Endpoint, local: Endpoint, own: Iterable[Endpoint] = ()) -> None:
    """Refuse, before any SYN, to dial an endpoint that is our own.

    Args:
        remote: the endpoint about to be dialled.
        local: our bound endpoint (its ip may be unspecified, ``0.0.0.0``/``::``).
        own: our other endpoints: the local address the OS chose and the
            server-reflexive one the rendezvous observed.

    Raises:
        SelfDialError: ``remote`` is ``local``, one of ``own``, or, when bound to
            the unspecified address, a loopback or unspecified address on our port
            (``127.0.0.0/8``, ``::1``, ``0.0.0.0``, ``::``; an IPv4-mapped address
            is its IPv4 one, see :class:`~punch.Endpoint`).
    """
    mine = {local, *own}
    if remote in mine:
        raise SelfDialError(f"refusing to dial {remote}: it is our own endpoint")
    if remote.port == local.port and local.address.is_unspecified:
        if remote.address.is_loopback or remote.address.is_unspecified:
            raise SelfDialError(f"refusing to dial {remote}: it reaches our own port")


def abort(sock: trio.socket.SocketType) -> None:
    """Close ``sock`` at once with an RST (``SO_LINGER`` 0, socket(7)).

    No FIN_WAIT/TIME_WAIT is left holding the 4-tuple, so the same local port
    can dial the same remote again at once. Never raises.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass  # already closed or never connected: close() alone is right
    sock.close()


class Redial:
    """The socket of a dial refused by an ICMP error, kept for the next dial to the same remote.

    Behind a NAT or firewall that answers unsolicited SYNs with an ICMP
    unreachable, our own NAT (Linux conntrack) keeps the entry our refused SYN
    made, tracking that SYN's sequence numbers. A later SYN re-initialises the
    entry only while it is in SYN_SENT; once the peer's SYN has met it
    (SYN_SENT2), only segments within the tracked window pass
    (nf_conntrack_proto_tcp.c, ``tcp_in_window``), and a fresh socket's ISN,
    drawn from a clock that runs at 15.6 M/s (RFC 6528), is far outside it.
    Connected again, the kept socket sends its next SYN where it left off (the
    refused ISN + 3: ``tcp_disconnect`` moves ``write_seq`` on by 2), within the
    window, so that SYN still makes the simultaneous open.

    Which refusal it was comes from the socket's error queue (ip(7)
    ``IP_RECVERR``, on while connecting): an ICMP error is queued there, an RST
    is not. After an RST the socket is closed: the RST closed our own NAT's
    entry, so nothing is tracked to stay within. :func:`prime` then reopens
    that entry with a socket kept here, and the next dial goes on from it.

    An ICMP error that arrives while our own ``connect`` call still holds the
    socket (a path of microseconds, as in a lab with no delay) is only a soft
    error (``sk_err_soft``, tcp_ipv4.c ``tcp_v4_err``): the connect reports the
    refusal, yet the socket stays in SYN_SENT and may still meet the peer's SYN
    in a simultaneous open. The next dial then lets that open finish and returns
    the socket, instead of disconnecting it with an RST (:func:`_reopen`).

    Pass one ``Redial`` to every :func:`dial` of one remote; :meth:`close` it
    when done. Not for concurrent dials. Linux only; elsewhere nothing is kept.
    """

    def __init__(self) -> None:
        self._sock: trio.socket.SocketType | None = None
        self._remote: Endpoint | None = None

    @property
    def kept(self) -> bool:
        """Whether a refused socket waits for the next dial."""
        return self._sock is not None

    def _take(self, remote: Endpoint) -> trio.socket.SocketType | None:
        sock, self._sock = self._sock, None
        if sock is not None and remote != self._remote:
            abort(sock)
            return None
        return sock

    def _keep(self, sock: trio.socket.SocketType, remote: Endpoint) -> None:
        self.close()
        self._sock, self._remote = sock, remote

    def close(self) -> None:
        """Close a kept socket (with an RST if it had one to send). Never raises."""
        if self._sock is not None:
            abort(self._sock)
            self._sock = None


_TCP_ESTABLISHED, _TCP_SYN_RECV = 1, 3  # include/net/tcp_states.h
_AF_UNSPEC_SOCKADDR = struct.pack("H14x", socket.AF_UNSPEC)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _tcp_state(sock: trio.socket.SocketType) -> int:
    """The socket's TCP state (``tcpi_state``, the first byte of ``TCP_INFO``, tcp(7))."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
"""ip(7) / ipv6(7) option numbers; Python's socket module lacks them."""
_ORIGINS_ICMP = (2, 3)  # SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6 (linux/errqueue.h)


def _recverr(sock: trio.socket.SocketType, on: bool) -> None:
    """Queue ICMP errors on ``sock``'s error queue (ip(7) ``IP_RECVERR``), or stop.

    On only while connecting: on an established connection it would make an
    ICMP error a hard error (tcp_v4_err), where TCP otherwise rides them out.
    """
    level, option = (
        (socket.IPPROTO_IPV6, IPV6_RECVERR)
        if sock.family == socket.AF_INET6
        else (socket.IPPROTO_IP, IP_RECVERR)
    )
    try:
        sock.setsockopt(level, option, int(on))
    except OSError:
        pass  # not Linux: a refusal is then taken for an RST


def _drain_errors(sock: trio.socket.SocketType) -> bool:
    """Empty ``sock``'s error queue; whether it held an ICMP error (ip(7) ``IP_RECVERR``)."""
    icmp = False
    with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
        dup.setblocking(False)
        while True:
            try:
                _, ancillary, _, _ = dup.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
            except OSError:  # EAGAIN: empty
                return icmp
            # struct sock_extended_err: u32 ee_errno, u8 ee_origin, ...
            icmp |= any(len(data) > 4 and data[4] in _ORIGINS_ICMP for _, _, data in ancillary)


def _disconnect(sock: trio.socket.SocketType) -> None:
    """``connect`` to ``AF_UNSPEC`` (connect(2)): back to unconnected, still bound.

    Linux's ``tcp_disconnect`` moves the next sequence number on by 2 and
    aborts a connect still under way without sending anything (a SYN_SENT
    socket's error becomes ``ECONNRESET``, cleared here); stdlib sockets cannot
    pass ``AF_UNSPEC`` to ``connect``, hence libc. The error queue is drained
    first: an ICMP error left there would keep the socket polling as failed.
    """
    _drain_errors(sock)
    if _libc().connect(sock.fileno(), _AF_UNSPEC_SOCKADDR, len(_AF_UNSPEC_SOCKADDR)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"disconnect failed: {os.strerror(code)}")
    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _reopen(sock: trio.socket.SocketType) -> bool:
    """Ready a kept socket (:class:`Redial`) for its next SYN; whether the peer's SYN met
    it meanwhile.

    A refusal is not always the end of the socket: an ICMP error that arrives
    while a call of ours holds the socket (a path of microseconds) is only a
    soft error (``sk_err_soft``, tcp_ipv4.c ``tcp_v4_err``), reported as the
    connect's failure, while the socket stays in SYN_SENT. The peer's SYN may
    then meet it: a simultaneous open, under way (SYN_RECV) or done
    (ESTABLISHED). Such a socket is left to finish, its filter removed, and
    True is returned: a disconnect would answer the peer with an RST
    (``tcp_disconnect``), which puts both NATs' entries in CLOSE for 10 s
    (``nf_conntrack_tcp_timeout_close``), where behind an RST-answering NAT
    the peer's every later SYN is refused (the netns lab's ``cone-rst x
    cone-icmp`` cell failed about 1 trial in 25 that way, when the peer's
    retry reached a kept socket just as our own retry took it). Any other
    socket is disconnected and False returned. A filter that drops every
    segment is on from before the look at the state (and stays on after a
    disconnect), so no SYN can slip in between the look and the disconnect.
    """
    if sys.platform.startswith("linux"):
        _attach_filter(sock, _DROP_ALL)
    if _tcp_state(sock) in (_TCP_ESTABLISHED, _TCP_SYN_RECV):
        _detach_filter(sock)
        return True
    _disconnect(sock)
    return False


async def _connect(sock: trio.socket.SocketType, remote: Endpoint, refused_before: bool) -> None:
    """Connect ``sock``; one whose last connect was refused is reopened first
    (:func:`_reopen`), or waited for if the peer's SYN met it meanwhile."""
    if refused_before and not _reopen(sock):
        _detach_filter(sock)  # disconnected: deaf no more, the SYN goes now
    await sock.connect(remote.sockaddr())  # an open under way: EALREADY, then wait


async def dial(
    local: _EndpointLike,
    remote: _EndpointLike,
    own: Iterable[Endpoint] = (),
    *,
    redial: Redial | None = None,
    shared: bool = True,
) -> trio.SocketStream:
    """Connect from ``local`` (shared with the listener) to ``remote``.

    Args:
        local: our bound endpoint, the one the listener holds (:class:`~punch.Endpoint`,
            ``(ip, port)`` or ``"ip:port"``).
        remote: the endpoint to dial, of ``local``'s family.
        own: see :func:`check_not_self`.
        redial: where a socket refused by an ICMP error is kept and taken from
            (see :class:`Redial`): the next dial with the same ``redial`` and
            ``remote`` connects that socket again, or, if the peer's SYN met it
            meanwhile, waits for that simultaneous open and returns it.
        shared: False: a socket of its own, without the reuse options, from a
            new port of ``local``'s address that ``connect`` picks (``local``'s
            port is ignored; ip(7) ``IP_BIND_ADDRESS_NO_PORT``): a birthday
            punch's probe (:mod:`punch._birthday`).

    Returns:
        a connected :class:`trio.SocketStream`.

    Raises:
        TypeError, ValueError: not endpoints, or of different families.
        SelfDialError: before connecting (see :func:`check_not_self`), or after
            it when the socket connected to itself (``getsockname() ==
            getpeername()``), which then is closed.
        ReuseUnavailable: see :func:`bind_reusable`.
        OSError: the connect failed (refused, unreachable, ``EADDRNOTAVAIL``
            when this 4-tuple is already connected).

    ``SO_LINGER`` 0 is set before connecting: a cancelled connect is closed by
    trio itself, and a plain close of a socket in SYN_RECV (a simultaneous open
    under way) would send a FIN and hold the 4-tuple in FIN_WAIT1, so the next
    dial of this candidate would get ``EADDRNOTAVAIL``. Once connected, linger
    is switched off again, so a stream that wins closes gracefully. Its
    retransmissions are capped at a second (:func:`cap_retransmission_timeout`);
    bound the connect with ``trio.move_on_after``, since the kernel then retries
    a SYN up to :data:`PUNCH_SYN_RETRIES` times.
    """
    local, remote = _endpoints(local, remote, own)
    sock = redial._take(remote) if redial is not None else None
    refused_before = sock is not None
    if sock is None:
        sock = bind_reusable(local) if shared else _bind_new_port(local)
    try:
        _before_connect(sock, redial is not None)
        await _connect(sock, remote, refused_before)
        if sock.getsockname() == sock.getpeername():
            raise SelfDialError(f"TCP self-connect on {remote}: the socket reached itself")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
        if redial is not None:
            _recverr(sock, False)
    except OSError as exc:
        refused = exc.errno in REFUSALS and not isinstance(exc, SelfDialError)
        if redial is not None and refused and _drain_errors(sock):
            redial._keep(sock, remote)
        else:
            abort(sock)
        raise
    except BaseException:
        abort(sock)
        raise
    return trio.SocketStream(sock)


def _endpoints(
    local: _EndpointLike, remote: _EndpointLike, own: Iterable[Endpoint]
) -> tuple[Endpoint, Endpoint]:
    local, remote = as_endpoint(local, "local"), as_endpoint(remote, "remote")
    if local.family != remote.family:
        raise ValueError(f"cannot dial {remote} from {local}: different address families")
    check_not_self(remote, local, own)
    return local, remote


def _before_connect(sock: trio.socket.SocketType, keep_refused: bool) -> None:
    """A dial's socket options: closed with an RST, retransmissions capped, and
    (with a :class:`Redial`) ICMP errors queued, to tell a refusal's origin."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    cap_retransmission_timeout(sock)
    if keep_refused:
        _recverr(sock, True)


PRIME_TTL = 2
"""IPv4 TTL (IPv6 hop limit) of a priming SYN (:func:`prime`): the first router,
our NAT, forwards it; the next one drops it."""


def prime(
    local: _EndpointLike,
    remote: _EndpointLike,
    redial: Redial,
    own: Iterable[Endpoint] = (),
    *,
    ttl: int = PRIME_TTL,
) -> None:
    """Send one SYN to ``remote`` that opens our own NAT's entry and dies before
    the peer's NAT, from a socket that ``redial`` then keeps; returns at once.

    Against a NAT that answers unsolicited SYNs with an RST, crossing SYNs
    must meet within one round trip between the NATs (microseconds in a lab
    with no delay), and each SYN that comes too early draws an RST that closes
    the sender's NAT entry. A SYN that expires on the way (ip(7) ``IP_TTL``,
    ipv6(7) ``IPV6_UNICAST_HOPS``: ``ttl`` routers) provokes no RST: our NAT's
    entry then stays open for the peer's SYN, which is dropped at our end (by
    this socket, and by the listener's filter, :func:`drop_syns_from`, once
    the router's ICMP time exceeded has aborted it) until the next
    :func:`dial` with ``redial`` connects the same socket again, its SYN
    continuing the sequence that entry tracks (see :class:`Redial`) and
    meeting the peer's socket in a simultaneous open. The TTL is back to the
    route's default before this returns, so that SYN goes all the way. Until
    then the socket is deaf (a socket filter that drops every segment; ICMP
    errors still reach it): the router's ICMP time exceeded can come back
    after the peer's SYN, and it would abort a socket that had answered that
    SYN, half-way through a simultaneous open the peer then holds (the netns
    lab's 25 ms cells: 2 trials in 3 took 2 s, one failed). The classic
    "TTL-limited SYN" of TCP NAT traversal (Guha and Francis, IMC 2005,
    "Characterization and measurement of TCP traversal through NATs and
    firewalls": STUNT).

    Args:
        local, remote, own: as for :func:`dial`.
        redial: keeps the primed socket for the next :func:`dial` to ``remote``.
        ttl: 1-255 routers the SYN may cross (default :data:`PRIME_TTL`: a NAT
            one hop away; a NAT further away is not opened, and nothing else
            changes).

    Raises:
        TypeError, ValueError: as for :func:`dial`, or ``ttl`` out of range.
        SelfDialError, ReuseUnavailable: as for :func:`dial`.
        OSError: the SYN could not be sent (``EADDRNOTAVAIL``, ``ENETUNREACH``...).
    """
    if not 1 <= ttl <= 255:
        raise ValueError(f"ttl must be 1-255, not {ttl!r}")
    local, remote = _endpoints(local, remote, own)
    sock = redial._take(remote)
    level, option = (
        (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
        if remote.family == socket.AF_INET6
        else (socket.IPPROTO_IP, socket.IP_TTL)
    )
    try:
        if sock is None:
            sock = bind_reusable(local)
        elif _reopen(sock):
            redial._keep(sock, remote)  # the peer's SYN met it: the next dial waits for it
            return
        _before_connect(sock, True)
        sock.setsockopt(level, option, ttl)
        try:  # the SYN leaves within connect(2); trio's connect would wait for an answer
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
                dup.setblocking(False)
                code = dup.connect_ex(remote.sockaddr())
        finally:
            sock.setsockopt(level, option, -1)  # the route's default (ip(7), ipv6(7))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, f"priming SYN to {remote}: {os.strerror(code)}")
        if sys.platform.startswith("linux"):
            _attach_filter(sock, _DROP_ALL)  # deaf until the next dial: see above
    except BaseException:
        if sock is not None:
            abort(sock)
        raise
    redial._keep(sock, remote)


SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
"""socket(7) option numbers (asm-generic/socket.h); Python's socket module lacks them."""
MAX_DROPPED_SOURCES = 64
"""Endpoints :func:`drop_syns_from` takes at most: 10 instructions each (IPv6), far
below the kernel's 4096 (``BPF_MAXINSNS``)."""
_SKF_NET_OFF = -0x100000
"""Classic BPF's offset of the network header (linux/filter.h); a TCP socket's
filter otherwise sees the packet from its TCP header on."""
_LD_W, _LD_H, _LD_B, _AND, _JEQ, _RET = 0x20, 0x28, 0x30, 0x54, 0x15, 0x06
_DROP_ALL = [(_RET, 0, 0, 0)]
"""The classic BPF program that drops every packet (a primed socket's, see :func:`prime`)."""


def _syn_filter(endpoints: tuple[Endpoint, ...]) -> list[tuple[int, int, int, int]]:
    """The classic BPF program: drop a SYN without ACK from any of ``endpoints``."""
    blocks: list[list[tuple[int, int]]] = []
    for endpoint in endpoints:
        packed = endpoint.address.packed
        source = 12 if endpoint.family == socket.AF_INET else 8  # IPv4 / IPv6 source address
        block = []
        for i, (word,) in enumerate(struct.iter_unpack("!I", packed)):
            block += [(_LD_W, _SKF_NET_OFF + source + 4 * i), (_JEQ, word)]
        if endpoint.port:  # port 0: any port of the address
            block += [(_LD_H, 0), (_JEQ, endpoint.port)]  # TCP source port
        blocks.append(block)
    body = sum(len(b) for b in blocks)
    program = [(_LD_B, 0, 0, 13), (_AND, 0, 0, 0x12), (_JEQ, 0, body, 0x02)]  # SYN, no ACK
    after = body
    for block in blocks:
        after -= len(block)
        for i, (code, k) in enumerate(block):
            if code != _JEQ:
                program.append((code, 0, 0, k))
            elif i == len(block) - 1:  # the whole endpoint matched: to the drop
                program.append((code, after + 1, 0, k))
            else:  # a mismatch: to the next endpoint's block
                program.append((code, 0, len(block) - i - 1, k))
    return [*program, (_RET, 0, 0, 0xFFFFFFFF), (_RET, 0, 0, 0)]


def drop_syns_from(listener: trio.socket.SocketType, endpoints: Iterable[Endpoint]) -> bool:
    """Make ``listener`` drop, unanswered, the opening SYNs from ``endpoints``.

    For a punch, from its first dial to an endpoint on: once that dial is
    refused, and until the next one, a SYN from the endpoint would reach the
    listener (the refusal may even come back after that SYN),
    whose SYN-ACK draws a fresh ISN that the NAT in front of us does not track
    (see :class:`Redial`; our packets then leave it untranslated) and whose
    half-open connection holds the 4-tuple against our next dial
    (``EADDRNOTAVAIL``). Dropped, the SYN is retransmitted by its sender while
    our next dial crosses it in a simultaneous open. A classic BPF socket filter
    (socket(7) ``SO_ATTACH_FILTER``; no privilege needed) replaces any earlier
    one; an empty ``endpoints`` removes it. Endpoints of the other family are
    left out. Connections already accepted, and segments other than a SYN
    without ACK, pass. An endpoint with port 0 stands for every port of its
    address (a birthday punch's peer, :mod:`punch._birthday`).

    Args:
        listener: a listening TCP socket.
        endpoints: at most :data:`MAX_DROPPED_SOURCES` of them.

    Returns:
        whether the filter is in place (``False`` where the OS has no socket filters).

    Raises:
        ValueError: more than :data:`MAX_DROPPED_SOURCES` endpoints.
        OSError: the kernel refused the filter (``ENOMEM``).
    """
    family = listener.family
    chosen = tuple(e for e in dict.fromkeys(endpoints) if e.family == family)
    if len(chosen) > MAX_DROPPED_SOURCES:
        raise ValueError(f"{len(chosen)} endpoints: at most {MAX_DROPPED_SOURCES}")
    if not sys.platform.startswith("linux"):
        return False
    if not chosen:
        _detach_filter(listener)
    else:
        _attach_filter(listener, _syn_filter(chosen))
    return True


def _attach_filter(sock: trio.socket.SocketType, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF ``program`` to ``sock`` (socket(7) ``SO_ATTACH_FILTER``)."""
    code = b"".join(struct.pack("HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _detach_filter(sock: trio.socket.SocketType) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # none attached
            raise
