"""The pytest plugin installed with punch: two fixtures for pytest-trio tests.

Every pytest-trio test can ask for them::

    async def test_my_protocol(punch_pair):
        initiator, responder = punch_pair
        await initiator.send_all(b"hello")
        assert await responder.receive_some() == b"hello"

- ``punch_rendezvous``: a rendezvous server on 127.0.0.1, port chosen by the
  kernel, for the length of the test; its value is the bound :class:`Endpoint`.
- ``punch_pair``: two hosts on loopback, punched to each other through it; its
  value is ``(initiator's stream, responder's stream)``, both closed afterwards.

Outside pytest, use :mod:`punch.testing`, which this wraps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._endpoint import Endpoint
from ._stream import PeerStream
from .testing import open_rendezvous, open_stream_pair

__all__ = ["punch_pair", "punch_rendezvous"]


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
