"""Reusable TCP sockets: one local ip:port for the listener and every dial.

TCP names a connection by its 4-tuple (RFC 9293 §3.4), so a listener, the
rendezvous control connection and one socket per outbound attempt can all be
bound to the same local endpoint, provided each sets ``SO_REUSEADDR`` and
``SO_REUSEPORT`` before ``bind`` (socket(7)). go-reuseport does the same.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import struct
from collections.abc import Iterable

import trio

from ._endpoint import Endpoint
from ._errors import HalfOpenTimeout, ReuseUnavailable, SelfDialError

log = logging.getLogger("punch.reuse")

LISTEN_BACKLOG = 128
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)
TCP_SYN_RECV = 3
"""``tcpi_state`` of a socket that answered a SYN and awaits the ACK (include/net/tcp_states.h)."""
HALF_OPEN_POLL = 0.1
"""Seconds between two looks at a connecting socket's state (``TCP_INFO``, tcp(7))."""


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


def bind_reusable(local: Endpoint) -> trio.socket.SocketType:
    """A new TCP socket with both reuse options set, bound to ``local``.

    Synchronous: ``local`` is a numeric address, so ``bind`` never blocks.

    Args:
        local: the endpoint to bind; port 0 lets the kernel choose.

    Raises:
        ReuseUnavailable: the options cannot be set on this OS.
        OSError: ``bind`` failed (``EADDRINUSE`` when a socket without the
            options, or of another user, holds the port).
    """
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


def open_listener(local: Endpoint) -> trio.SocketListener:
    """A listening socket on ``local`` that dials on the same port can share.

    Raises:
        ReuseUnavailable, OSError: as :func:`bind_reusable`.
    """
    sock = bind_reusable(local)
    try:
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def check_not_self(remote: Endpoint, local: Endpoint, own: Iterable[Endpoint] = ()) -> None:
    """Refuse, before any SYN, to dial an endpoint that is our own.

    Args:
        remote: the endpoint about to be dialled.
        local: our bound endpoint (its ip may be unspecified, ``0.0.0.0``/``::``).
        own: our other endpoints: the local address the OS chose and the
            server-reflexive one the rendezvous observed.

    Raises:
        SelfDialError: ``remote`` is ``local``, one of ``own``, or, when bound to
            the unspecified address, a loopback or unspecified address on our port.
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


def tcp_state(sock: trio.socket.SocketType) -> int | None:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, the first byte of
    ``TCP_INFO``, tcp(7)), or ``None`` where the OS does not tell."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (AttributeError, OSError):
        return None


async def _connect(
    sock: trio.socket.SocketType, remote: Endpoint, half_open_timeout: float
) -> None:
    """``connect``, given up with :class:`HalfOpenTimeout` once the socket has sat in
    SYN_RECV for ``half_open_timeout`` seconds (trio then closes it: an RST, with
    the ``SO_LINGER`` 0 that :func:`dial` sets)."""
    if half_open_timeout == math.inf:
        await sock.connect(remote.sockaddr())
        return
    stalled = False
    error: OSError | None = None
    async with trio.open_nursery() as nursery:

        async def connect() -> None:
            nonlocal error
            try:
                await sock.connect(remote.sockaddr())
            except OSError as exc:  # raised here, not as an ExceptionGroup from the nursery
                error = exc
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal stalled
            since = None
            while True:
                await trio.sleep(HALF_OPEN_POLL)
                if tcp_state(sock) != TCP_SYN_RECV:
                    since = None
                    continue
                now = trio.current_time()
                since = now if since is None else since
                if now - since >= half_open_timeout:
                    stalled = True
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(connect)
        nursery.start_soon(watch)
    if error is not None:
        raise error
    if stalled:
        raise HalfOpenTimeout(
            f"half-open to {remote} for {half_open_timeout:g} s: our SYN-ACK was not acknowledged"
        )


async def dial(
    local: Endpoint,
    remote: Endpoint,
    own: Iterable[Endpoint] = (),
    *,
    half_open_timeout: float = math.inf,
) -> trio.SocketStream:
    """Connect from ``local`` (shared with the listener) to ``remote``.

    Args:
        local: our bound endpoint, the one the listener holds.
        remote: the candidate to dial.
        own: see :func:`check_not_self`.
        half_open_timeout: seconds (> 0; default no limit) the socket may sit in
            SYN_RECV, a simultaneous open whose SYN-ACK is unacknowledged,
            before the dial is aborted with an RST; watched by ``TCP_INFO``
            every :data:`HALF_OPEN_POLL` s where the OS has it (Linux).

    Returns:
        a connected :class:`trio.SocketStream`.

    Raises:
        SelfDialError: before connecting (see :func:`check_not_self`), or after
            it when the socket connected to itself (``getsockname() ==
            getpeername()``), which then is closed.
        ReuseUnavailable: see :func:`bind_reusable`.
        HalfOpenTimeout: the socket sat in SYN_RECV for ``half_open_timeout`` s.
        OSError: the connect failed (refused, unreachable, ``EADDRNOTAVAIL``
            when this 4-tuple is already connected).

    ``SO_LINGER`` 0 is set before connecting: a cancelled connect is closed by
    trio itself, and a plain close of a socket in SYN_RECV (a simultaneous open
    under way) would send a FIN and hold the 4-tuple in FIN_WAIT1, so the next
    dial of this candidate would get ``EADDRNOTAVAIL``. Once connected, linger
    is switched off again, so a stream that wins closes gracefully.
    """
    check_not_self(remote, local, own)
    sock = bind_reusable(local)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        await _connect(sock, remote, half_open_timeout)
        if sock.getsockname() == sock.getpeername():
            raise SelfDialError(f"TCP self-connect on {remote}: the socket reached itself")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    except BaseException:
        abort(sock)
        raise
    return trio.SocketStream(sock)
