"""Connections that wait for their next bytes without a task each: one epoll(7) set.

A registered peer spends nearly all its life waiting for its next frame (a
keepalive every 15 s, now and then a ConnectRequest). A trio task per waiting
connection costs about 5 KiB: the task, its coroutine frames, cancel scopes
and trio's per-descriptor waiter record. Parked here, a connection costs one
dict entry: its descriptor sits in our own epoll set (``EPOLLONESHOT``, so it
fires once per parking), whose descriptor a single task waits on with
:func:`trio.lowlevel.wait_readable`. When a parked connection has bytes (or a
FIN, an RST, an error: ``EPOLLRDHUP``, and ``EPOLLHUP``/``EPOLLERR`` always), it
leaves the set and a fresh task answers it, then parks it again.

Idle expiry needs no timer per connection either: every connection is parked
with the same idle timeout, so parking order is deadline order, and one
task sleeps until the oldest deadline.

Linux only (epoll); the rendezvous server parks only while :meth:`Parking.run`
runs, and serves a task per connection otherwise.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
"""Readable, or the peer's FIN (``EPOLLHUP``/``EPOLLERR`` are always reported); once."""


@attrs.define(eq=False)
class Parking(Generic[T]):
    """Items (connections), each keyed by its socket's descriptor, parked until it
    is readable or has been idle ``idle`` seconds.

    Args:
        on_readable: run in a new task when a parked item's descriptor is
            readable (bytes, a FIN, an RST or an error); the item has left.
        on_idle: run in a new task when an item has stayed parked ``idle``
            seconds; the item has left.
        idle: seconds, > 0: how long an item may stay parked.
        on_shutdown: called for each item still parked when :meth:`run` ends
            (cancelled): close its connection. Must not raise.
    """

    on_readable: Callable[[T], Awaitable[None]]
    on_idle: Callable[[T], Awaitable[None]]
    idle: float
    on_shutdown: Callable[[T], None]
    _parked: dict[int, tuple[T, float]] = attrs.field(factory=dict, init=False)
    """Descriptor → (item, deadline), in parking order, which is deadline order."""
    _epoll: select.epoll | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    @property
    def running(self) -> bool:
        """True while :meth:`run` runs: :meth:`park` may be called."""
        return self._nursery is not None

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, fd: int) -> bool:
        return fd in self._parked

    def park(self, item: T, fd: int) -> None:
        """Park ``item`` until ``fd`` (its open socket's descriptor) is readable, or
        for ``idle`` seconds from now.

        The caller keeps the descriptor open while it is parked: to close it,
        :meth:`wake` the item first (a descriptor closed while parked would
        leave our set, and its number could come back for another socket).

        Raises:
            RuntimeError: :meth:`run` is not running.
            OSError: ``fd`` cannot be watched (closed: ``EBADF``).
        """
        if self._epoll is None:
            raise RuntimeError("Parking.run is not running")
        try:
            self._epoll.modify(fd, _EVENTS)  # parked before: still in the set, disarmed
        except FileNotFoundError:  # ENOENT: first parking of this socket
            self._epoll.register(fd, _EVENTS)
        self._parked[fd] = (item, trio.current_time() + self.idle)

    def wake(self, fd: int) -> bool:
        """Take the item parked on ``fd`` out now and run ``on_readable`` for it, as if
        it had become readable (for example before its socket is closed). False:
        none was parked there."""
        item = self._take(fd)
        if item is None:
            return False
        assert self._nursery is not None  # parked items exist only while run runs
        self._nursery.start_soon(self.on_readable, item)
        return True

    def _take(self, fd: int) -> T | None:
        entry = self._parked.pop(fd, None)
        if entry is None:
            return None
        assert self._epoll is not None
        try:
            self._epoll.modify(fd, 0)  # disarmed: an event now would find nobody
        except OSError:
            pass  # closed meanwhile (then it left the set by itself)
        return entry[0]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the parked items until cancelled; then ``on_shutdown`` each one left.

        Follows trio's ``nursery.start`` protocol. Tasks for woken items run in
        a nursery of this call's own, so they are cancelled with it.

        Raises:
            RuntimeError: it is already running.
        """
        if self._epoll is not None:
            raise RuntimeError("Parking.run is already running")
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire)
                task_status.started()
                await self._dispatch(nursery)
        finally:
            self._nursery = None
            parked, self._parked = self._parked, {}
            self._epoll.close()
            self._epoll = None
            for item, _ in parked.values():
                self.on_shutdown(item)

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        assert self._epoll is not None
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            for fd, _ in self._epoll.poll(0):
                entry = self._parked.pop(fd, None)
                if entry is not None:  # else: woken or expired since the event came
                    nursery.start_soon(self.on_readable, entry[0])

    async def _expire(self) -> None:
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            while self._parked:
                fd, (item, deadline) = next(iter(self._parked.items()))
                if deadline > now:
                    break
                self._take(fd)
                self._nursery.start_soon(self.on_idle, item)
            else:
                deadline = now + self.idle  # none parked: none can expire sooner
            await trio.sleep_until(deadline)
