"""punch.testing, used the way an application's own test suite would use it."""

from __future__ import annotations

import subprocess
import sys

import trio

from punch import Endpoint, PeerStream, Role
from punch.testing import open_stream_pair


async def test_the_pair_fixture_is_a_punched_connection(
    punch_pair: tuple[PeerStream, PeerStream],
) -> None:
    initiator, responder = punch_pair
    await initiator.send_all(b"hello")
    assert await responder.receive_some() == b"hello"
    assert (initiator.role, responder.role) == (Role.INITIATOR, Role.RESPONDER)
    assert initiator.local == responder.remote
    # the fixture's streams are what users get by default: TLS 1.3, keys proven
    assert (initiator.encrypted, responder.encrypted) == (True, True)
    assert None not in (initiator.peer_id, responder.peer_id)


async def test_many_pairs_share_one_rendezvous(punch_rendezvous: Endpoint) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_one_pair, punch_rendezvous)


async def _one_pair(rendezvous: Endpoint) -> None:
    async with open_stream_pair(rendezvous) as (a, b):
        await b.send_all(b"x")
        assert await a.receive_some() == b"x"


async def test_a_pair_without_a_server_brings_its_own() -> None:
    async with open_stream_pair() as (a, b):
        await a.send_eof()
        assert await b.receive_some() == b""


def test_the_helpers_import_without_pytest() -> None:
    # an application's own script, where pytest is not installed
    script = "import sys; sys.modules['pytest'] = None; import punch.testing"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
