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

import functools
import logging
import socket
import struct
from collections.abc import Iterable

import trio

from ._endpoint import Endpoint, as_endpoint
from ._errors import ReuseUnavailable, SelfDialError

__all__ = ["abort", "available", "bind_reusable", "check_not_self", "dial", "open_listener"]

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


def open_listener(local: _EndpointLike) -> trio.SocketListener:
    """A listening socket on ``local`` that dials on the same port can share.

    Args:
        local: as :func:`bind_reusable`; the backlog is :data:`LISTEN_BACKLOG` (128).

    Raises:
        TypeError, ValueError, ReuseUnavailable, OSError: as :func:`bind_reusable`.
    """
    sock = bind_reusable(local)
    try:
        sock.listen(LISTEN_BACKLOG)
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


def cap_retransmission_timeout(sock: trio.socket.SocketType) -> None:
    """Retransmit at least every second while a punch lasts (``TCP_RTO_MAX_MS`` 1000);
    also for the life of a control connection, whose few small frames a punch waits on.

    Under loss a punch rests on retransmissions: our SYNs, the SYN-ACK of a
    simultaneous open, the handshake's few small messages. Linux backs them off
    (1, 3, 7 s for a SYN-ACK; data after a retransmitted SYN starts at the 3 s
    fallback of RFC 6298 §5.7), so with 20% loss on each WAN link one lost
    message could outlast the 10 s deadline. Capped, each is tried again every
    second at most (the initial RTO of RFC 6298 §2.1). The kept stream stays
    capped through TLS until the peer's first application bytes arrive (only
    then has every handshake message of ours arrived), then gets the system's
    bound back (:func:`restore_retransmission_timeout`); losers are aborted.
    Linux 6.15 and later; elsewhere nothing changes. Never raises.

    Capped, the default ``tcp_syn_retries`` of 6 (tcp(7)) would abandon a SYN,
    or a simultaneous open's SYN-ACK, after 7 s (``ETIMEDOUT``), before the
    punch's or the registration's deadline; so the count goes up too, to
    :data:`PUNCH_SYN_RETRIES`, and the caller's deadline ends the connect. In
    the 20% loss cell a peer's half-open dial gave up at 7 s while the other
    side held the connection (2 trials in 20 failed so, none with the count
    raised), and a registration failed at 7 s of its 10.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, PUNCH_RTO_MAX_MS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, PUNCH_SYN_RETRIES)
    except (OSError, AttributeError):
        pass  # an older kernel (ENOPROTOOPT), or another OS: its backoff outlasts 7 s


def restore_retransmission_timeout(sock: trio.socket.SocketType) -> None:
    """Undo :func:`cap_retransmission_timeout`: the system's bound again. Never raises."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, _system_rto_max_ms())
    except OSError:
        pass


@functools.cache
def _system_rto_max_ms() -> int:
    try:
        with open("/proc/sys/net/ipv4/tcp_rto_max_ms") as sysctl:
            return int(sysctl.read())
    except (OSError, ValueError):
        return DEFAULT_RTO_MAX_MS


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


async def dial(
    local: _EndpointLike, remote: _EndpointLike, own: Iterable[Endpoint] = ()
) -> trio.SocketStream:
    """Connect from ``local`` (shared with the listener) to ``remote``.

    Args:
        local: our bound endpoint, the one the listener holds (:class:`~punch.Endpoint`,
            ``(ip, port)`` or ``"ip:port"``).
        remote: the endpoint to dial, of ``local``'s family.
        own: see :func:`check_not_self`.

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
    local, remote = as_endpoint(local, "local"), as_endpoint(remote, "remote")
    if local.family != remote.family:
        raise ValueError(f"cannot dial {remote} from {local}: different address families")
    check_not_self(remote, local, own)
    sock = bind_reusable(local)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        cap_retransmission_timeout(sock)
        await sock.connect(remote.sockaddr())
        if sock.getsockname() == sock.getpeername():
            raise SelfDialError(f"TCP self-connect on {remote}: the socket reached itself")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    except BaseException:
        abort(sock)
        raise
    return trio.SocketStream(sock)
