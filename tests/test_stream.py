"""PeerStream hands over bytes read past the handshake, then reads the socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from punch import Endpoint, PeerStream, Role, WonBy


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PeerStream, trio.SocketStream]]:
    ours, theirs = (trio.SocketStream(s) for s in trio.socket.socketpair())
    end = Endpoint("127.0.0.1", 1)
    stream = PeerStream(
        ours, "bob", Role.INITIATOR, end, end, WonBy.CONNECT, bytes(16), 0.0, pending=b"abc"
    )
    yield stream, theirs
    await stream.aclose()
    await theirs.aclose()


@pytest.mark.parametrize("size", [0, -1])
async def test_a_max_size_below_one_is_a_value_error_like_trio(
    pair: tuple[PeerStream, trio.SocketStream], size: int
) -> None:
    stream, theirs = pair
    with pytest.raises(ValueError, match="max_bytes"):
        await stream.receive_some(size)  # with bytes pending: not b"" (end of stream)
    assert await stream.receive_some(2) == b"ab"  # nothing was lost
    assert await stream.receive_some() == b"c"
    with pytest.raises(ValueError, match="max_bytes"):
        await stream.receive_some(size)  # nothing pending: trio's own check
    await theirs.send_all(b"d")
    assert await stream.receive_some(10) == b"d"
