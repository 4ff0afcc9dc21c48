"""The punched connection handed to applications, and an exact reader for handshakes."""

from __future__ import annotations

import enum
import ssl

import attrs
import trio

from . import reuse
from ._birthday import ProbeReport
from ._endpoint import Endpoint, Role
from ._errors import HandshakeInterrupted
from ._handover import Handover
from ._outcome import Attempt
from ._tls import TLSStream

_RECEIVE_SIZE = 65536


class WonBy(enum.Enum):
    """Which side of the race produced the kept connection."""

    CONNECT = "connect"
    """Our outbound SYN (or a simultaneous open, RFC 9293 §3.5) connected."""
    ACCEPT = "accept"
    """The peer's SYN reached our listener."""


class StreamPath(enum.Enum):
    """How the kept connection's bytes travel (RFC 8445 §5.1.1 candidate types)."""

    DIRECT = "direct"
    """Peer to peer: a host, server-reflexive or predicted candidate, or a probe."""
    RELAYED = "relayed"
    """Through the rendezvous's relay, which splices our connection to the peer's
    and reads no payload (:mod:`punch._relay`)."""


def _lost(exc: trio.BrokenResourceError) -> HandshakeInterrupted:
    return HandshakeInterrupted(f"connection lost during the handshake: {exc.__cause__ or exc}")


@attrs.define(eq=False)
class ExactReader:
    """Reads exact byte counts from a stream, keeping what it read past them.

    Args:
        stream: a connected :class:`trio.SocketStream`.
    """

    stream: trio.SocketStream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def exactly(self, size: int) -> bytes:
        """Exactly ``size`` bytes.

        Raises:
            HandshakeInterrupted: the peer closed or reset the connection first.
        """
        while len(self.buffer) < size:
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                raise _lost(exc) from exc
            if not data:
                raise HandshakeInterrupted("peer closed the connection during the handshake")
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def send(self, data: bytes) -> None:
        """Send ``data`` (nothing at all when it is empty).

        Raises:
            HandshakeInterrupted: the connection broke.
        """
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise _lost(exc) from exc


@attrs.define(eq=False)
class PeerStream(trio.abc.HalfCloseableStream):
    """An authenticated TCP connection to a peer, encrypted by TLS 1.3 by default:
    direct, or through a relay where no direct path was found (:attr:`path`).

    A kernel TCP socket underneath: the methods are those of
    :class:`trio.SocketStream`, and raise what it raises
    (:class:`trio.BrokenResourceError`, :class:`trio.ClosedResourceError`).
    On an encrypted stream (:attr:`encrypted`) they read and write TLS
    application data, and :meth:`send_eof` sends TLS ``close_notify`` and a
    FIN: TLS 1.3 half-closes like TCP (RFC 8446 §6.1).

    Attributes:
        peer_name: the peer's registered name.
        role: our :class:`~punch.Role` in the attempt that made it.
        local: our end of the 4-tuple (``getsockname()``).
        remote: the peer's end as we see it (``getpeername()``); behind a
            NAT this is the peer's NAT's public endpoint; on a relayed
            stream, the relay's endpoint.
        path: :class:`StreamPath`: ``direct``, or ``relayed`` through the
            relay's endpoint (:attr:`remote`); the bytes and the
            authentication are the same either way.
        won_by: :class:`WonBy`: our connect or our listener's accept.
        attempt_id: the introduction's 16-byte attempt id.
        connect_time: seconds from receiving the introduction to holding this
            authenticated, nominated stream.
        attempts: every connect attempt of the punch, in the order they ended
            (:class:`~punch.Attempt`: candidate, number, start and end in
            seconds from the introduction, outcome, error); the winning one,
            if we won by connect, has the outcome ``NOMINATED``.
        probes: a birthday punch's probes (:class:`~punch.ProbeReport`), or
            None when the punch made none (a probe that connected is in
            ``attempts`` too).
        peer_id: the peer's peer ID (:attr:`punch.Identity.peer_id`), proven
            by its TLS certificate; ``None`` on a plaintext stream.
        tls_time: seconds the TLS handshake took after nomination (0.0 on a
            plaintext stream); :attr:`connect_time` includes it.
        moved: set (a :class:`trio.Event`) when a relayed stream has moved to
            a direct connection (:meth:`punch.Host.upgrade`): ``await
            stream.moved.wait()``; :attr:`path`, :attr:`local`,
            :attr:`remote` and :attr:`socket` tell the new connection then.
    """

    socket_stream: trio.SocketStream
    peer_name: str
    role: Role
    local: Endpoint
    remote: Endpoint
    won_by: WonBy
    attempt_id: bytes = attrs.field(repr=lambda b: b.hex())
    connect_time: float
    _pending: bytearray = attrs.field(factory=bytearray, converter=bytearray, alias="pending")
    attempts: tuple[Attempt, ...] = ()
    probes: ProbeReport | None = None
    path: StreamPath = StreamPath.DIRECT
    peer_id: str | None = None
    tls_time: float = 0.0
    _started_tls: TLSStream | None = attrs.field(default=None, alias="started_tls")
    """Our TLS, started in the race: the initiator's ClientHello went with its Hello, the
    responder's server flight answered it."""
    _tls: TLSStream | None = attrs.field(default=None, init=False)
    _capped: bool = attrs.field(default=True, init=False)
    """Retransmissions still capped at a second, as through the punch."""
    moved: trio.Event = attrs.field(factory=trio.Event, init=False)
    _transport: trio.abc.HalfCloseableStream = attrs.field(init=False)
    """What the bytes (TLS's, when encrypted) run over: the socket stream, or, on a
    relayed stream, a :class:`~punch._handover.Handover` that can move to a direct one."""

    def __attrs_post_init__(self) -> None:
        self._transport = self.socket_stream
        if self.path is StreamPath.RELAYED:
            self._transport = Handover(self.socket_stream)
            if self._started_tls is not None:
                self._started_tls.transport = self._transport

    @property
    def handover(self) -> Handover | None:
        """A relayed stream's :class:`~punch._handover.Handover` (None when direct from
        the start)."""
        return self._transport if isinstance(self._transport, Handover) else None

    async def move_to(self, direct: PeerStream) -> None:
        """Carry on over ``direct``, the plaintext stream of a punch for this stream's
        upgrade (see :mod:`punch._handover`). Sets :attr:`moved`.

        Raises:
            RuntimeError: not a relayed stream, or moved already.
            trio.ClosedResourceError: this stream was closed (``direct`` is closed too).
        """
        handover = self.handover
        if handover is None:
            raise RuntimeError("only a relayed stream moves")
        new = direct.socket_stream
        reuse.restore_retransmission_timeout(new.socket)  # a kept stream from here
        await handover.move(new, bytes(direct._pending))
        self.socket_stream = new
        self.local, self.remote, self.won_by = direct.local, direct.remote, direct.won_by
        self.path = StreamPath.DIRECT
        self.moved.set()

    @property
    def socket(self) -> trio.socket.SocketType:
        """The underlying trio socket (for ``getsockopt`` and the like)."""
        return self.socket_stream.socket

    @property
    def encrypted(self) -> bool:
        """True once TLS protects the stream."""
        return self._tls is not None

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool) -> TLSStream:
        """Run the TLS handshake over this stream; from then on every byte is TLS's.

        Bytes the punch handshake read past its end are TLS records, and go first.
        Where the race already started TLS (the initiator's ClientHello leaves with
        its Hello, the responder's server flight answers it), the handshake goes on
        from there, with that context.

        Returns:
            the :class:`~punch._tls.TLSStream` (for its ``ssl_object``).

        Raises:
            trio.BrokenResourceError: as :meth:`punch._tls.TLSStream.do_handshake`.
        """
        tls = self._started_tls or TLSStream(
            self._transport, context, server_side=server_side, pending=bytes(self._pending)
        )
        self._pending.clear()  # (empty when TLS was started: the race gave it the bytes)
        await tls.do_handshake()
        self._tls = tls
        return tls

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._tls is not None:
            await self._tls.send_all(data)
        else:
            await self._transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._tls is not None:
            await self._tls.send_eof()
        else:
            await self._transport.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` bytes (default: what is there); ``b""`` at end of stream.

        Bytes the peer sent right after the handshake, which the handshake
        read, come first.

        Raises:
            ValueError: ``max_bytes`` is below 1, as :class:`trio.SocketStream`.
            trio.BrokenResourceError, trio.ClosedResourceError: as it.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        if self._tls is not None:
            data = await self._tls.receive_some(max_bytes)
        elif self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            data = bytes(self._pending[:size])
            del self._pending[:size]
            await trio.lowlevel.checkpoint()
        else:
            data = bytes(await self._transport.receive_some(max_bytes))
        if data and self._capped:
            # The peer sent application data, so it holds every handshake message we
            # sent (its last one, our Nomination or TLS Finished, may be unacknowledged
            # until now): from here the system's retransmission bound applies.
            self._capped = False
            reuse.restore_retransmission_timeout(self.socket)
        return data

    async def aclose(self) -> None:
        if self._tls is not None:
            await self._tls.aclose()
        else:
            await self._transport.aclose()
