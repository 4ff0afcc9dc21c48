"""Hostile lifecycles against the real ``punch-rendezvous --relay`` process, on loopback.

What a scanner or a broken peer does to a relay port that faces the internet:
connect and reset, reset halfway through a Bind, bind and reset, bind and
half-close, and a bound pair whose reader never reads. After each, the same
process must still be running and still relay a new pair of real hosts.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from netns.scenario import PUNCH, PairRun, wait_for

import punch
from punch import Endpoint, Role
from punch._protocol import (
    Bind,
    ConnectRequest,
    Introduction,
    RelayGrant,
    encode_frame,
)
from punch._relay import bind, bind_proof
from tests.helpers import raw_client, register

ROUNDS = 50
RELAY = [*PUNCH, "relay"]
_LINGER_ABORT = struct.pack("ii", 1, 0)


@pytest.fixture
def relay_process() -> Iterator[tuple[Endpoint, subprocess.Popen[bytes]]]:
    pair = PairRun()
    try:
        argv = ["-q", "--relay", "--relay-port", "0", "--relay-bind-timeout", "2"]
        address = pair.start_rendezvous([], "127.0.0.1:0", *argv)
        yield Endpoint.parse(address), pair.processes[-1]
    finally:
        pair.close()


async def _grants(rendezvous: Endpoint, a: str, b: str) -> tuple[RelayGrant, RelayGrant]:
    """The relay grants of one real introduction between raw clients ``a`` and ``b``."""
    async with raw_client(rendezvous) as first, raw_client(rendezvous) as second:
        await register(first, a)
        await register(second, b)
        await first.send(ConnectRequest(b, 1, 0.0))
        introductions = [await first.receive(), await second.receive()]
    grants = [i.relay for i in introductions if isinstance(i, Introduction)]
    first_grant, second_grant = grants
    assert first_grant is not None, introductions
    assert second_grant is not None, introductions
    return first_grant, second_grant


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def _connect(grant: RelayGrant) -> socket.socket:
    return socket.create_connection(grant.endpoint.sockaddr(), timeout=5)


def _bind_frame(grant: RelayGrant, role: Role) -> bytes:
    return encode_frame(Bind(grant.ticket, role, bind_proof(grant.key, role)))


async def _still_relays(rendezvous: Endpoint, process: subprocess.Popen[bytes]) -> None:
    """The process runs, and two real hosts get a relayed stream through it."""
    assert process.poll() is None, "the rendezvous process exited"
    with trio.fail_after(10):
        async with (
            punch.open_host("carol", rendezvous=rendezvous, timeout=5) as carol,
            punch.open_host("dave", rendezvous=rendezvous, timeout=5) as dave,
            trio.open_nursery() as nursery,
        ):
            accepted: list[punch.PeerStream] = []

            async def accept() -> None:
                accepted.append(await dave.accept())

            nursery.start_soon(accept)
            to_dave = await carol.connect("dave", relay="only")
        assert to_dave.path is punch.StreamPath.RELAYED
        await to_dave.send_all(b"through")
        assert await accepted[0].receive_some(100) == b"through"
        await to_dave.aclose()
        await accepted[0].aclose()
    assert process.poll() is None


async def test_connect_and_reset_on_the_relay_port(
    relay_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    rendezvous, process = relay_process
    grant, _ = await _grants(rendezvous, "a1", "b1")
    for _ in range(ROUNDS):
        _reset(_connect(grant))
    await _still_relays(rendezvous, process)


async def test_reset_halfway_through_a_bind(
    relay_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    rendezvous, process = relay_process
    grant, _ = await _grants(rendezvous, "a2", "b2")
    frame = _bind_frame(grant, Role.INITIATOR)
    for cut in (1, 4, len(frame) // 2, len(frame) - 1):
        for _ in range(ROUNDS // 5):
            sock = _connect(grant)
            sock.sendall(frame[:cut])
            _reset(sock)
    await _still_relays(rendezvous, process)


async def test_bind_then_reset_and_the_other_side_comes(
    relay_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """The initiator binds and resets; the responder's bind is then spliced to a dead
    connection: it is reset, and nothing else is."""
    rendezvous, process = relay_process
    for i in range(ROUNDS // 10):
        mine, theirs = await _grants(rendezvous, f"a3-{i}", f"b3-{i}")
        sock = _connect(mine)
        sock.sendall(_bind_frame(mine, Role.INITIATOR))
        _reset(sock)
        stream = await trio.open_tcp_stream(theirs.endpoint.ip, theirs.endpoint.port)
        with trio.fail_after(5):
            try:
                rest = await bind(stream, theirs, Role.RESPONDER)
                assert await stream.receive_some(100) == b"", rest  # the reset side's end
            except (punch.HandshakeInterrupted, punch.RelayRefused, trio.BrokenResourceError):
                pass  # refused (bind-timeout), or reset: either ends this one stream
        await stream.aclose()
    await _still_relays(rendezvous, process)


async def test_bind_then_half_close(
    relay_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """Bind, FIN, never read: held until the bind timeout (2 s here), then let go."""
    rendezvous, process = relay_process
    held = []
    try:
        for i in range(ROUNDS // 5):
            grant, _ = await _grants(rendezvous, f"a4-{i}", f"b4-{i}")
            sock = _connect(grant)
            sock.sendall(_bind_frame(grant, Role.INITIATOR))
            sock.shutdown(socket.SHUT_WR)
            held.append(sock)
        await _still_relays(rendezvous, process)
    finally:
        for sock in held:
            sock.close()


async def test_a_bound_reader_that_never_reads(
    relay_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """One side pours, the other never reads: the relay holds one chunk and waits,
    and relays the next pair meanwhile."""
    rendezvous, process = relay_process
    initiator, responder = await _grants(rendezvous, "a5", "b5")
    ends: dict[Role, trio.SocketStream] = {}

    async def one(grant: RelayGrant, role: Role) -> None:
        stream = await trio.open_tcp_stream(grant.endpoint.ip, grant.endpoint.port)
        await bind(stream, grant, role)
        ends[role] = stream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, initiator, Role.INITIATOR)
        nursery.start_soon(one, responder, Role.RESPONDER)
    sent = 0
    with trio.move_on_after(1):  # the pour stops when every buffer on the way is full
        while True:
            await ends[Role.INITIATOR].send_all(b"x" * 65536)
            sent += 65536
    assert sent < 64 << 20  # TCP buffers and one relay chunk, not an unbounded queue
    await _still_relays(rendezvous, process)
    for stream in ends.values():
        await trio.aclose_forcefully(stream)


async def test_punch_relay_serves_a_rendezvous_that_announces_it(tmp_path: Path) -> None:
    """The real ``punch-relay`` and ``punch-rendezvous --relay-at``, one secret file."""
    secret = tmp_path / "relay.key"
    secret.write_text(secrets.token_hex(32) + "\n")
    pair = PairRun()
    try:
        relay = pair.start(
            "relay",
            [],
            [*RELAY, "--listen", "127.0.0.1:0", "-q", "--relay-secret-file", str(secret)],
        )
        where = wait_for(pair.workdir / "relay.out", lambda t: t.endswith("\n"), relay, "relay")
        address = pair.start_rendezvous(
            [], "127.0.0.1:0", "-q", "--relay-at", where.strip(), "--relay-secret-file", str(secret)
        )
        await _still_relays(Endpoint.parse(address), pair.processes[-1])
        assert relay.poll() is None
    finally:
        pair.close()
