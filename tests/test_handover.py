"""A relayed stream's live move to a direct connection (issue 17, part 4), on loopback."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import punch
from punch import Endpoint, RelayLimits, StreamPath
from punch._relay import Relay

CHUNK = 65536


async def _serve(nursery: trio.Nursery) -> tuple[Endpoint, Relay]:
    relay = Relay(RelayLimits(rate=1 << 30))
    rendezvous = await nursery.start(
        functools.partial(punch.serve_rendezvous, "127.0.0.1", 0, relay_port=0, relay=relay)
    )
    return rendezvous, relay


@asynccontextmanager
async def _relayed(
    rendezvous: Endpoint, **options: object
) -> AsyncIterator[tuple[punch.Host, punch.Host, punch.PeerStream, punch.PeerStream]]:
    """alice and bob, and alice's relayed stream to bob and bob's to alice."""
    async with (
        punch.open_host("alice", rendezvous=rendezvous, **options) as alice,  # type: ignore[arg-type]
        punch.open_host("bob", rendezvous=rendezvous, **options) as bob,  # type: ignore[arg-type]
    ):
        streams: dict[str, punch.PeerStream] = {}

        async def accept() -> None:
            streams["bob"] = await bob.accept()

        async def connect() -> None:
            streams["alice"] = await alice.connect("bob", relay="only")

        async with trio.open_nursery() as both:
            both.start_soon(accept)
            both.start_soon(connect)
        yield alice, bob, streams["alice"], streams["bob"]


async def _send(stream: punch.PeerStream, payload: bytes) -> None:
    """``payload`` in 64 KiB writes 2 ms apart (load shaping, not a wait on anything:
    the transfer lasts long enough for the move, about 60 ms here with its 50 ms of
    priming, to land in its middle)."""
    for at in range(0, len(payload), CHUNK):
        await stream.send_all(payload[at : at + CHUNK])
        await trio.sleep(0.002)
    await stream.send_eof()


async def _receive(
    stream: punch.PeerStream,
    into: bytearray,
    paths: list[StreamPath],
    quarter: trio.Event | None = None,
) -> None:
    """Everything to the end, and the path the stream said it had at each read;
    ``quarter`` is set once 1 MiB has come."""
    while data := await stream.receive_some(CHUNK):
        into += data
        paths.append(stream.path)
        if quarter is not None and len(into) >= 1 << 20:
            quarter.set()


@pytest.mark.parametrize("encrypt", [True, False], ids=["tls", "plaintext"])
async def test_a_relayed_stream_moves_mid_transfer_both_ways_intact(
    nursery: trio.Nursery, encrypt: bool
) -> None:
    rendezvous, relay = await _serve(nursery)
    up, down = secrets.token_bytes(8 << 20), secrets.token_bytes(6 << 20)
    got_up, got_down = bytearray(), bytearray()
    paths_up: list[StreamPath] = []
    paths_down: list[StreamPath] = []
    async with _relayed(rendezvous, encrypt=encrypt) as (alice, _, to_bob, to_alice):
        assert (to_bob.path, to_alice.path) == (StreamPath.RELAYED, StreamPath.RELAYED)
        moved: list[bool] = []
        quarter = trio.Event()

        async def upgrade_once_bytes_flow() -> None:
            await quarter.wait()  # the move starts mid-transfer
            moved.append(await alice.upgrade(to_bob))

        with trio.fail_after(30):
            async with trio.open_nursery() as transfer:
                transfer.start_soon(_send, to_bob, up)
                transfer.start_soon(_send, to_alice, down)
                transfer.start_soon(_receive, to_alice, got_up, paths_up, quarter)
                transfer.start_soon(_receive, to_bob, got_down, paths_down)
                transfer.start_soon(upgrade_once_bytes_flow)
    assert moved == [True]
    for paths in (paths_up, paths_down):  # bytes came both ways, then the other way
        assert paths[0] is StreamPath.RELAYED
        assert paths[-1] is StreamPath.DIRECT
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert to_bob.moved.is_set()
    assert to_alice.moved.is_set()
    assert (to_bob.path, to_alice.path) == (StreamPath.DIRECT, StreamPath.DIRECT)
    assert to_bob.remote == to_alice.local
    assert to_bob.encrypted is encrypt
    assert not relay.circuits  # the relayed connection is closed
    await to_bob.aclose()
    await to_alice.aclose()


async def test_only_the_initiator_moves_a_relayed_stream(nursery: trio.Nursery) -> None:
    rendezvous, _ = await _serve(nursery)
    async with _relayed(rendezvous) as (alice, bob, to_bob, to_alice):
        with pytest.raises(ValueError, match="initiator"):
            await bob.upgrade(to_alice)
        with pytest.raises(ValueError, match="not a stream of this host"):
            await bob.upgrade(to_bob)
        direct = await alice.connect("bob", relay="never")
        with pytest.raises(ValueError, match="only a relayed stream"):
            await alice.upgrade(direct)
        for stream in (to_bob, direct, to_alice):
            await stream.aclose()


async def test_a_stream_closed_before_its_move_closes_the_new_connection_too(
    nursery: trio.Nursery,
) -> None:
    rendezvous, _ = await _serve(nursery)
    async with _relayed(rendezvous) as (alice, _, to_bob, to_alice):
        handover = to_bob.handover
        assert handover is not None
        await handover.aclose()  # as if closed while the punch ran: the TLS stays up
        assert await alice.upgrade(to_bob) is False
        assert not to_bob.moved.is_set()
        with trio.fail_after(5):  # bob's side moved, onto a connection alice closed
            await to_alice.moved.wait()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await to_alice.receive_some(100)  # TLS: a FIN without close_notify
        await to_alice.aclose()
        await to_bob.aclose()
