"""Hostile client lifecycles against the real ``punch rendezvous`` process, on loopback.

Each lifecycle is what a scanner, a load balancer's health check or a peer on
a flaky path does to a server that faces the internet: connect and reset,
register and reset, reset halfway through a frame, half-close and wait, and
never read. After each, the same process must still be running, still
register a new peer, and hold no name for a connection that is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import trio
from netns.scenario import PairRun
from tools.redis import RedisServer

import punch
from punch import Endpoint
from punch._host import signed_register
from punch._protocol import Challenge, ConnectRequest, RendezvousConnection, Side, encode_frame
from tests.helpers import IDENTITY, raw_client, register

ROUNDS = 50
"""Hostile connections per lifecycle: the crash of issue 13 took 24 resets."""
_LINGER_ABORT = struct.pack("ii", 1, 0)


@pytest.fixture(params=["alone", "redis"])
def rendezvous_process(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Endpoint, subprocess.Popen[bytes]]]:
    """The real server: alone, and in a cluster (``--redis``, issue 18: its handler
    awaits Redis while counting, claiming and releasing)."""
    with ExitStack() as stack:
        args = ["-q", "--registration-timeout", "3"]
        if request.param == "redis":
            if shutil.which("redis-server") is None and not os.environ.get("CI"):
                pytest.skip("no redis-server (make netns-deps installs it)")
            args += ["--redis", stack.enter_context(RedisServer()).url]
        pair = PairRun()
        stack.callback(pair.close)
        address = pair.start_rendezvous([], "127.0.0.1:0", *args)
        yield Endpoint.parse(address), pair.processes[-1]


def _reset(sock: socket.socket) -> None:
    """Close with an RST (``SO_LINGER`` 0), as a scanner or health check does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def _connect(rendezvous: Endpoint) -> socket.socket:
    return socket.create_connection(rendezvous.sockaddr(), timeout=5)


def _register_frame(sock: socket.socket, name: str) -> bytes:
    """Read the server's Challenge from ``sock``: the signed Register frame answering it."""
    connection = RendezvousConnection(Side.CLIENT)
    messages: list[object] = []
    while not messages:
        data = sock.recv(4096)
        assert data, "the rendezvous closed before its Challenge"
        messages = list(connection.receive_data(data))
    challenge = messages[0]
    assert isinstance(challenge, Challenge)
    return connection.send(signed_register(IDENTITY, challenge, name))


async def _still_serves(
    rendezvous: Endpoint, process: subprocess.Popen[bytes], name: str = "survivor"
) -> None:
    """The process runs, and a real host registers ``name`` and is introduced."""
    assert process.poll() is None, "the rendezvous process exited"
    with trio.fail_after(10):
        async with punch.open_host(name, rendezvous=rendezvous, timeout=5) as host:
            with pytest.raises(punch.RendezvousError) as refused:
                await host.connect("nobody-here")
            assert refused.value.code == "unknown-peer"
    assert process.poll() is None


async def _name_is_free_soon(
    rendezvous: Endpoint, process: subprocess.Popen[bytes], name: str
) -> None:
    """``name`` registers within 5 s: the server may still be reading the last close."""
    with trio.fail_after(5):
        while True:
            try:
                return await _still_serves(rendezvous, process, name)
            except punch.RendezvousError as exc:
                if exc.code != "name-taken":
                    raise
            await trio.sleep(0.05)  # a bounded poll for a state we cannot observe


async def test_connect_and_reset_ends_only_that_connection(
    rendezvous_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    rendezvous, process = rendezvous_process
    for _ in range(ROUNDS):
        _reset(_connect(rendezvous))
    await _still_serves(rendezvous, process)


async def test_reset_after_register_frees_the_name(
    rendezvous_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """The Registered reply meets a reset socket: the name must not stay taken."""
    rendezvous, process = rendezvous_process
    for _ in range(ROUNDS):
        sock = _connect(rendezvous)
        sock.sendall(_register_frame(sock, "squatted"))
        _reset(sock)
    await _name_is_free_soon(rendezvous, process, "squatted")


async def test_reset_mid_frame_ends_only_that_connection(
    rendezvous_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    rendezvous, process = rendezvous_process
    frame = encode_frame(signed_register(IDENTITY, Challenge(bytes(32)), "half"))
    for cut in (1, 3, 4, len(frame) // 2, len(frame) - 1):
        for _ in range(ROUNDS // 5):
            sock = _connect(rendezvous)
            sock.sendall(frame[:cut])
            _reset(sock)
    await _still_serves(rendezvous, process)


async def test_a_half_closed_peer_leaves_and_its_name_is_freed(
    rendezvous_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """Register, then FIN without reading: the server takes it as leaving."""
    rendezvous, process = rendezvous_process
    held = []
    try:
        for i in range(ROUNDS // 5):
            sock = _connect(rendezvous)
            sock.sendall(_register_frame(sock, f"half-open-{i}"))
            sock.shutdown(socket.SHUT_WR)  # half-open from here: we never read
            held.append(sock)
        await _name_is_free_soon(rendezvous, process, "half-open-0")
    finally:
        for sock in held:
            sock.close()


async def test_a_peer_that_never_reads_is_dropped_alone(
    rendezvous_process: tuple[Endpoint, subprocess.Popen[bytes]],
) -> None:
    """A registered peer that asks for introductions it never reads, plus silent connects."""
    rendezvous, process = rendezvous_process
    silent = [_connect(rendezvous) for _ in range(ROUNDS // 5)]
    try:
        async with raw_client(rendezvous) as deaf:
            await register(deaf, "deaf")
            frames = b"".join(
                deaf.connection.send(ConnectRequest("nobody", i)) for i in range(1, 30)
            )
            await deaf.stream.send_all(frames)  # 29 errors come back; never read
            await _still_serves(rendezvous, process)
    finally:
        for sock in silent:
            _reset(sock)
