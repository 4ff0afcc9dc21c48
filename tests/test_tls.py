"""TLSStream over a real socket pair: TLS 1.3 that half-closes like TCP (issue 14, item 2)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from punch import Identity
from punch._tls import TLSStream


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.SocketStream(a), trio.SocketStream(b)


@asynccontextmanager
async def tls_pair(
    client_trusts: Identity | None = None,
) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """A client and a server TLSStream, handshaken; the client trusts ``client_trusts``
    (default: the server's real identity)."""
    client_id, server_id = Identity.generate(), Identity.generate()
    trusted = client_trusts or server_id
    a, b = await _socket_pair()
    client = TLSStream(
        a, client_id.tls_context(trusted.certificate, server_side=False), server_side=False
    )
    server = TLSStream(
        b, server_id.tls_context(client_id.certificate, server_side=True), server_side=True
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        yield client, server
    finally:
        await client.aclose()
        await server.aclose()


async def _read_all(stream: TLSStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_tls_13_with_both_certificates() -> None:
    async with tls_pair() as (client, server):
        assert client.ssl_object.version() == "TLSv1.3"
        assert server.ssl_object.getpeercert(binary_form=True) is not None
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"


async def test_each_side_half_closes_and_the_other_keeps_sending() -> None:
    async with tls_pair() as (client, server):
        await client.send_all(b"request")
        await client.send_eof()
        assert await _read_all(server) == b"request"  # ends in EOF: close_notify
        await server.send_all(b"answer after the client's EOF")
        await server.send_eof()
        assert await _read_all(client) == b"answer after the client's EOF"
        assert await client.receive_some() == b""  # EOF stays EOF


async def test_records_buffered_at_send_eof_are_not_lost() -> None:
    """The peer's records already read from the socket when we half-close are
    still delivered (``unwrap`` would discard what it reads)."""
    async with tls_pair() as (client, server):
        chunks = [bytes([i]) * 1000 for i in range(5)]
        for chunk in chunks:
            await client.send_all(chunk)  # one record each
        await trio.testing.wait_all_tasks_blocked()
        first = await server.receive_some(1)  # reads every record off the socket
        await server.send_eof()
        rest = first + await _read_all_until(server, 5000 - 1)
        assert rest == b"".join(chunks)


async def _read_all_until(stream: TLSStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


async def test_a_cut_without_close_notify_is_an_error_not_an_eof() -> None:
    async with tls_pair() as (client, server):
        await client.send_all(b"partial")
        await client.transport.send_eof()  # a FIN with no close_notify: truncation
        assert await server.receive_some() == b"partial"
        with pytest.raises(trio.BrokenResourceError) as info:
            await server.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_a_certificate_other_than_the_trusted_one_fails_the_handshake() -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        async with tls_pair(client_trusts=Identity.generate()):
            pass
    errors = [e for e in info.value.exceptions if isinstance(e, trio.BrokenResourceError)]
    assert any(isinstance(e.__cause__, ssl.SSLCertVerificationError) for e in errors)


async def test_max_bytes_is_checked() -> None:
    async with tls_pair() as (client, _):
        with pytest.raises(ValueError, match="max_bytes"):
            await client.receive_some(0)


async def test_one_context_serves_several_peers_each_with_its_own_certificate() -> None:
    """A host's cached context trusts every peer introduced so far (each by its own
    name); a handshake with each of them verifies."""
    me = Identity.generate()
    peers = [Identity.generate() for _ in range(3)]
    for peer in peers:
        me.tls_context(peer.certificate, server_side=False)
    for peer in peers:
        a, b = await _socket_pair()
        client = TLSStream(
            a, me.tls_context(peer.certificate, server_side=False), server_side=False
        )
        server = TLSStream(b, peer.tls_context(me.certificate, server_side=True), server_side=True)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert client.ssl_object.getpeercert(binary_form=True) == peer.certificate
