"""Moves rendezvous frames over a trio stream; used by the server and the host alike."""

from __future__ import annotations

from collections import deque

import attrs
import trio

from ._protocol import Message, RendezvousConnection

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
    _inbox: deque[Message] = attrs.field(factory=deque, init=False)
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
        return self._inbox.popleft()

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
