"""Test helpers for applications that use punch, usable anywhere (no pytest needed).

:func:`open_rendezvous` and :func:`open_stream_pair` are async context
managers on loopback only. Under pytest, the plugin :mod:`punch.pytest_plugin`
(installed with punch) gives the same as the fixtures ``punch_rendezvous`` and
``punch_pair``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._endpoint import Endpoint
from ._host import open_host
from ._server import serve_rendezvous
from ._stream import PeerStream

__all__ = ["open_rendezvous", "open_stream_pair"]


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
