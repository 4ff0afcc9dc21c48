"""Moves rendezvous frames over a trio stream; used by the server and the host alike."""

from __future__ import annotations

import os
import ssl

import attrs
import trio

from . import reuse
from ._endpoint import Endpoint
from ._errors import RendezvousError
from ._protocol import Message, RendezvousConnection, Side

_RECEIVE_SIZE = 4096


@attrs.define(eq=False)
class ControlChannel:
    """One rendezvous control connection: a stream plus its protocol state.

    Args:
        stream: the connected stream: a :class:`trio.SocketStream`, or a
            :class:`trio.SSLStream` over one.
        socket: the TCP socket underneath (for addresses and an abortive close).
        connection: the sans-IO :class:`RendezvousConnection` for our side.
    """

    stream: trio.abc.Stream
    socket: trio.socket.SocketType
    connection: RendezvousConnection
    _inbox: list[Message] = attrs.field(factory=list, init=False)
    """Messages read, not yet received (a list: a few at most, and an empty deque
    costs 600 bytes a connection)."""
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    async def receive(self) -> Message | None:
        """The next message, or ``None`` when the peer closed cleanly.

        Raises:
            RemoteProtocolError: the peer broke the protocol.
            trio.BrokenResourceError: the connection failed.
        """
        while not self._inbox:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            self._inbox.extend(self.connection.receive_data(data))
            if not data:
                return None
        return self._inbox.pop(0)

    async def receive_idle(self) -> Message | None:
        """:meth:`receive`, for a connection that mostly waits (a registered peer on
        the server): over plain TCP, :meth:`receive_ready` and, when nothing has
        arrived, a wait for readability (epoll), so a waiting connection holds a
        task stack four frames shorter than inside :meth:`receive`, and a busy one
        yields once a message, as :meth:`receive` does. Over TLS (which may hold
        decrypted bytes the socket does not show): :meth:`receive`.

        Raises:
            RemoteProtocolError: the peer broke the protocol.
            trio.BrokenResourceError: the connection failed.
            trio.ClosedResourceError: the stream was closed meanwhile.
        """
        if not isinstance(self.stream, trio.SocketStream):
            return await self.receive()
        waited = False
        while True:
            try:
                message = self.receive_ready()
            except trio.WouldBlock:
                pass  # waited for below, not here: inside this clause the exception
                # (its traceback: hundreds of bytes) would live as long as the wait
            else:
                break
            await trio.lowlevel.wait_readable(self.socket)
            waited = True
        if not waited:
            await trio.lowlevel.checkpoint()  # a flood of frames still lets others run
        return message

    def receive_ready(self) -> Message | None:
        """The next message if it has arrived, without waiting; ``None`` when the peer
        closed cleanly. Plain TCP only (a non-blocking read(2) of the descriptor).

        Raises:
            trio.WouldBlock: nothing more has arrived (wait for readability, ask again).
            RemoteProtocolError: the peer broke the protocol.
            trio.BrokenResourceError: the connection failed, or was closed here.
        """
        while not self._inbox:
            try:
                data = os.read(self.socket.fileno(), _RECEIVE_SIZE)
            except BlockingIOError:
                raise trio.WouldBlock from None
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            self._inbox.extend(self.connection.receive_data(data))
            if not data:
                return None
        return self._inbox.pop(0)

    async def send(self, message: Message) -> None:
        """Send one message; concurrent senders take turns.

        Raises:
            LocalProtocolError: we may not send it now.
            trio.BrokenResourceError, trio.ClosedResourceError: the connection failed.
        """
        await self.send_frame(self.connection.send(message))

    async def send_frame(self, frame: bytes) -> None:
        """Send a frame that ``connection.send`` has encoded; concurrent senders take turns.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: the connection failed.
        """
        async with self._send_lock:
            await self.stream.send_all(frame)


async def connect_control(
    local: Endpoint,
    server: Endpoint,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    hostname: str,
) -> ControlChannel:
    """A control connection from ``local`` (bound reusable) to ``server``, TLS with
    ``ssl_context``, within ``timeout`` seconds.

    Raises:
        RendezvousError: ``unreachable``: refused, timed out or the TLS handshake failed.
        OSError: ``local`` cannot be bound.
    """
    sock = reuse.bind_reusable(local)
    # Register, Introductions and keepalives are few and small, and a punch waits on them
    reuse.cap_retransmission_timeout(sock)
    stream: trio.abc.Stream
    try:
        with trio.fail_after(timeout):
            await sock.connect(server.sockaddr())
            stream = trio.SocketStream(sock)
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_hostname=hostname)
                await stream.do_handshake()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        reuse.abort(sock)
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        raise RendezvousError(
            "unreachable", f"cannot reach the rendezvous at {server}: {cause or exc}"
        ) from exc
    except BaseException:
        reuse.abort(sock)
        raise
    return ControlChannel(stream, sock, RendezvousConnection(Side.CLIENT))
