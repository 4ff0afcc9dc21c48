"""The byte stream under a relayed :class:`~punch.PeerStream`, and its live move to a direct one.

A relayed stream keeps its bytes when a direct path is found later (issue 17):
each side, once the direct connection is nominated, ends its direction of the
relayed connection with a FIN (the marker: the last byte it sends there) and
sends every later byte on the direct connection; each side reads the relayed
connection to that FIN, then the direct one. TCP delivers each connection in
order, so the two halves join without loss, duplication or reordering, and
TLS, which runs over this stream, never sees the seam: its records continue
on the new connection, its keys and sequence numbers unchanged.

A FIN on the relayed connection means "go on on the direct one" only while a
move is agreed or under way; else it is the end of the stream. The peer moves
only after the direct connection is nominated, which needs our side of that
punch, so a marker never comes before we know a move may come
(:meth:`Handover.begin`); its reader waits for the punch to end
(:meth:`Handover.end`) before it calls a FIN the end.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("punch.handover")


class Handover(trio.abc.HalfCloseableStream):
    """One TCP connection, then, after :meth:`move`, another; the bytes run on across.

    Args:
        stream: the connection the stream starts on (the relayed one).

    Raises (every method): what :class:`trio.SocketStream` raises.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sending = stream
        """Where our bytes go now."""
        self.receiving = stream
        """Where the peer's bytes come from now."""
        self._next: trio.SocketStream | None = None
        self._settled = trio.Event()  # no move under way
        self._settled.set()
        self._send_lock = trio.StrictFIFOLock()
        self._eof_sent = False
        self._old: trio.SocketStream | None = None
        self._first = b""  # read from the new connection by its punch: the peer's first bytes
        self._closed = False

    @property
    def moved(self) -> bool:
        """True once our sending is on the new connection."""
        return self._next is not None

    def begin(self) -> None:
        """A move may come (a punch for a direct connection is under way): a FIN read
        from here on waits for :meth:`end` before it counts as the end."""
        if self._next is None:
            self._settled = trio.Event()

    def end(self) -> None:
        """The punch is over without a new connection: FINs count as the end again."""
        self._settled.set()

    async def move(self, new: trio.SocketStream, first: bytes = b"") -> None:
        """Send from now on ``new``: a FIN on the old connection (the marker) first, or,
        if we ended our direction already, a FIN on ``new`` too. Never twice.

        ``first``: bytes of the peer's that the punch read from ``new`` past its
        handshake; they come right after the old connection's.
        """
        if self._next is not None:
            raise RuntimeError("a stream moves once")
        if self._closed:  # closed while its punch ran: the new connection is nobody's
            await new.aclose()
            raise trio.ClosedResourceError("the stream was closed before it could move")
        self._next, self._first = new, first
        self._settled.set()
        async with self._send_lock:
            old = self.sending
            try:
                await old.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the relay is gone already: the peer reads our bytes on the new one
            if self._eof_sent:
                await new.send_eof()
            self.sending = new
        self._old = old
        self._close_old_if_done()

    def _close_old_if_done(self) -> None:
        """Both directions have left the old connection: close it (FINs both ways)."""
        if self._old is not None and self.receiving is not self._old:
            # both FINs passed: a plain close, so the kernel still sends what it holds
            self._old.socket.close()
            self._old = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self.sending.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.sending.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._send_lock:
            self._eof_sent = True
            await self.sending.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            data = await self.receiving.receive_some(max_bytes)
            if data or self._next is self.receiving:
                return data
            await self._settled.wait()  # a FIN: the marker, if a move comes
            if self._next is None:
                return b""
            self.receiving = self._next
            log.info("the peer's bytes now come on the direct connection")
            self._close_old_if_done()
            if self._first:
                data, self._first = self._first, b""
                return data

    async def aclose(self) -> None:
        self._closed = True
        self._settled.set()
        for stream in {self.sending, self.receiving, self._next, self._old} - {None}:
            assert stream is not None
            await stream.aclose()
