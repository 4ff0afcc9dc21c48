"""Test helpers for applications that use punch; also a pytest plugin.

Installed with punch, the plugin gives every pytest-trio test two fixtures::

    async def test_my_protocol(punch_pair):
        initiator, responder = punch_pair
        await initiator.send_all(b"hello")
        assert await responder.receive_some() == b"hello"

- ``punch_rendezvous``: a rendezvous server on 127.0.0.1, port chosen by the
  kernel, for the length of the test; its value is the bound :class:`Endpoint`.
- ``punch_pair``: two hosts on loopback, punched to each other through it; its
  value is ``(initiator's stream, responder's stream)``, both closed afterwards.

Outside pytest, the same as async context managers: :func:`open_rendezvous`
and :func:`open_stream_pair`. Everything runs on loopback only.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from ._endpoint import Endpoint
from ._host import open_host
from ._server import serve_rendezvous
from ._stream import PeerStream

__all__ = ["open_rendezvous", "open_stream_pair", "punch_pair", "punch_rendezvous"]


@asynccontextmanager
async def open_rendezvous(host: str = "127.0.0.1") -> AsyncIterator[Endpoint]:
    """Run a rendezvous server on ``host`` (a loopback IP), any free port, for the block.

    Yields:
        the bound :class:`Endpoint`.

    Raises:
        OSError: the port could not be opened.
    """
    async with trio.open_nursery() as nursery:
        bound: Endpoint = await nursery.start(serve_rendezvous, host, 0)
        yield bound
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_stream_pair(
    rendezvous: Endpoint | None = None, *, timeout: float = 10.0
) -> AsyncIterator[tuple[PeerStream, PeerStream]]:
    """Two loopback hosts punched to each other; both streams are closed after the block.

    Args:
        rendezvous: a running server; default a fresh one for this pair.
        timeout: seconds (> 0) for the punch.

    Yields:
        ``(initiator's stream, responder's stream)``: one TCP connection.

    Raises:
        PunchFailed, RendezvousError: as :meth:`punch.Host.connect`.
    """
    if rendezvous is None:
        async with open_rendezvous() as server, open_stream_pair(server, timeout=timeout) as pair:
            yield pair
        return
    tag = secrets.token_hex(4)  # unique names: many pairs may share one server
    async with (
        open_host(f"initiator-{tag}", rendezvous=rendezvous, timeout=timeout) as initiator,
        open_host(f"responder-{tag}", rendezvous=rendezvous, timeout=timeout) as responder,
    ):
        accepted: list[PeerStream] = []

        async def accept() -> None:
            accepted.append(await responder.accept())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            connected = await initiator.connect(responder.name)
    async with connected, accepted[0]:
        yield connected, accepted[0]


@pytest.fixture
async def punch_rendezvous() -> AsyncIterator[Endpoint]:
    """A rendezvous server on loopback for the test; the value is its :class:`Endpoint`."""
    async with open_rendezvous() as bound:
        yield bound


@pytest.fixture
async def punch_pair(punch_rendezvous: Endpoint) -> AsyncIterator[tuple[PeerStream, PeerStream]]:
    """``(initiator's stream, responder's stream)``, punched on loopback for the test."""
    async with open_stream_pair(punch_rendezvous) as pair:
        yield pair
