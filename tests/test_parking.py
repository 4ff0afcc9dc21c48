"""punch._parking: connections that wait without a task each (epoll(7)), with real
socket pairs; idle expiry on trio's MockClock."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from punch._parking import Parking

IDLE = 10.0


class _Lot:
    """A Parking whose callbacks record what happened to which item, and when."""

    def __init__(self) -> None:
        self.readable: list[tuple[str, float]] = []
        self.idle: list[tuple[str, float]] = []
        self.shut: list[str] = []
        self.parking: Parking[str] = Parking(self._readable, self._idle, IDLE, self.shut.append)

    async def _readable(self, item: str) -> None:
        self.readable.append((item, trio.current_time()))

    async def _idle(self, item: str) -> None:
        self.idle.append((item, trio.current_time()))


@asynccontextmanager
async def running() -> AsyncIterator[_Lot]:
    lot = _Lot()
    async with trio.open_nursery() as nursery:
        await nursery.start(lot.parking.run)
        yield lot
        nursery.cancel_scope.cancel()


@contextmanager
def pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(count)]
    try:
        yield made
    finally:
        for a, b in made:
            a.close()
            b.close()


async def test_a_parked_socket_wakes_its_item_when_bytes_arrive() -> None:
    with pairs(2) as [(ours, theirs), (quiet, _)]:
        async with running() as lot:
            lot.parking.park("talker", ours.fileno())
            lot.parking.park("quiet", quiet.fileno())
            await trio.testing.wait_all_tasks_blocked()
            assert lot.readable == []
            theirs.send(b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert [item for item, _ in lot.readable] == ["talker"]
            assert ours.fileno() not in lot.parking  # it left: woken once per parking
            assert quiet.fileno() in lot.parking
            theirs.send(b"y")  # not parked again: nobody is woken
            await trio.testing.wait_all_tasks_blocked()
            assert len(lot.readable) == 1
            lot.parking.park("talker", ours.fileno())  # parked again with bytes waiting
            await trio.testing.wait_all_tasks_blocked()
            assert [item for item, _ in lot.readable] == ["talker", "talker"]


async def test_a_closed_or_reset_peer_wakes_its_item() -> None:
    with pairs(1) as [(ours, theirs)]:
        async with running() as lot:
            lot.parking.park("closing", ours.fileno())
            theirs.close()  # a FIN (EPOLLRDHUP): the item must learn of it
            await trio.testing.wait_all_tasks_blocked()
            assert [item for item, _ in lot.readable] == ["closing"]


async def test_idle_items_expire_in_parking_order_each_after_its_own_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pairs(2) as [(first, peer_of_first), (second, _)]:
        async with running() as lot:
            start = trio.current_time()
            lot.parking.park("first", first.fileno())
            await trio.sleep(4)
            lot.parking.park("second", second.fileno())
            await trio.sleep(5)
            peer_of_first.send(b"keepalive")  # at 9 s: first wakes, and parks again
            await trio.testing.wait_all_tasks_blocked()
            assert first.recv(64) == b"keepalive"  # read, as the server does before parking
            lot.parking.park("first", first.fileno())
            await trio.sleep(30)
            expired = [(item, when - start) for item, when in lot.idle]
            assert expired == [("second", 4 + IDLE), ("first", 9 + IDLE)]
            assert len(lot.parking) == 0


async def test_wake_takes_an_item_out_before_its_socket_closes() -> None:
    with pairs(1) as [(ours, _)]:
        async with running() as lot:
            lot.parking.park("dropped", ours.fileno())
            assert lot.parking.wake(ours.fileno())
            assert not lot.parking.wake(ours.fileno())  # once only
            ours.close()
            await trio.testing.wait_all_tasks_blocked()
            assert [item for item, _ in lot.readable] == ["dropped"]
            assert lot.idle == []


async def test_cancelled_it_hands_back_every_item_still_parked() -> None:
    with pairs(2) as [(a, _), (b, _)]:
        async with running() as lot:
            lot.parking.park("a", a.fileno())
            lot.parking.park("b", b.fileno())
        assert sorted(lot.shut) == ["a", "b"]
        assert not lot.parking.running
        with pytest.raises(RuntimeError, match="not running"):
            lot.parking.park("late", a.fileno())


async def test_it_runs_once_at_a_time() -> None:
    async with running() as lot:
        with pytest.raises(RuntimeError, match="already running"):
            await lot.parking.run()


@pytest.fixture
def regular_file(tmp_path: Path) -> Iterator[int]:
    """A descriptor of a regular file (which epoll(7) cannot watch)."""
    fd = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


async def test_a_descriptor_epoll_cannot_watch_is_refused_and_not_parked(regular_file: int) -> None:
    async with running() as lot:
        with pytest.raises(PermissionError):  # EPERM: a regular file (epoll_ctl(2))
            lot.parking.park("file", regular_file)
        assert regular_file not in lot.parking
