"""The rendezvous process under attack, on loopback: slowloris and a garbage flood.

Each test prints its figures (pytest -s shows them); the assertions are the
bars of issue 4: a new peer still registers at once, every idle connection
is dropped by its deadline, the server survives and gives its memory back.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from netns.scenario import PairRun

import punch
from punch import Endpoint

SLOWLORIS = 1000
FLOOD = 10_000
FLOOD_CONCURRENCY = 100


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * SLOWLORIS + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


@pytest.fixture
def rendezvous_process() -> Iterator[tuple[Endpoint, int]]:
    pair = PairRun()
    try:
        address = pair.start_rendezvous([], "127.0.0.1:0", "-q", "--registration-timeout", "3")
        yield Endpoint.parse(address), pair.processes[-1].pid
    finally:
        pair.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _time_to_register(rendezvous: Endpoint, name: str) -> float:
    start = time.perf_counter()
    async with punch.open_host(name, rendezvous=rendezvous, timeout=5):
        return time.perf_counter() - start


async def test_slowloris_does_not_delay_a_new_peer(
    rendezvous_process: tuple[Endpoint, int],
) -> None:
    rendezvous, _ = rendezvous_process
    quiet = await _time_to_register(rendezvous, "before")
    streams = []
    try:
        for _ in range(SLOWLORIS):
            streams.append(await trio.open_tcp_stream(rendezvous.ip, rendezvous.port))
        opened = time.perf_counter()
        under_attack = await _time_to_register(rendezvous, "during")
        closed_at: list[float] = []

        async def wait_for_close(stream: trio.SocketStream) -> None:
            while await stream.receive_some():  # the Error frame, then EOF
                pass
            closed_at.append(time.perf_counter() - opened)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(wait_for_close, stream)
    finally:
        for stream in streams:
            await stream.aclose()
    print(
        f"\nslowloris: {SLOWLORIS} idle connections; registration {quiet * 1000:.1f} ms before, "
        f"{under_attack * 1000:.1f} ms during; all dropped within {max(closed_at):.2f} s "
        f"(deadline 3 s)"
    )
    assert under_attack < 1.0  # far below the 3 s the idle connections hold out for
    assert len(closed_at) == SLOWLORIS
    assert max(closed_at) < 3.0 + 2.0


async def test_a_garbage_flood_leaves_the_server_alive_and_lean(
    rendezvous_process: tuple[Endpoint, int],
) -> None:
    rendezvous, pid = rendezvous_process
    await _time_to_register(rendezvous, "warmup")
    before = _rss_mib(pid)
    sent = 0
    start = time.perf_counter()

    async def garbage(count: int) -> None:
        nonlocal sent
        for i in range(count):
            stream = await trio.open_tcp_stream(rendezvous.ip, rendezvous.port)
            async with stream:
                try:
                    await stream.send_all(b"GET / HTTP/1.1\r\n\r\n" if i % 2 else b"P\x01\xff\xff")
                    await stream.receive_some()  # the error frame (or the close)
                except trio.BrokenResourceError:
                    pass
            sent += 1

    async with trio.open_nursery() as nursery:
        for _ in range(FLOOD_CONCURRENCY):
            nursery.start_soon(garbage, FLOOD // FLOOD_CONCURRENCY)
    seconds = time.perf_counter() - start
    after_flood = _rss_mib(pid)
    registration = await _time_to_register(rendezvous, "after")
    print(
        f"\nflood: {sent} garbage connections in {seconds:.1f} s; server RSS {before:.1f} MiB "
        f"before, {after_flood:.1f} MiB after; a new registration then took "
        f"{registration * 1000:.1f} ms"
    )
    assert sent == FLOOD
    assert after_flood < before + 16  # nothing per connection is kept
