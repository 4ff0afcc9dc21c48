"""Model-based test of the rendezvous registry (issue 4).

Hypothesis writes programs of register / connect / keepalive / leave / wait
steps for four clients that compete for three names. Each program runs
against a real :class:`RendezvousServer` on loopback, under a manual
:class:`trio.testing.MockClock`, next to a plain-Python model of what the
server must do. After every step:

- every reply is exactly the model's (an introduction goes to the requester
  and to the current holder of the name, with each one's own candidates,
  and to nobody else);
- no other client has anything to read: no candidate leaks;
- the server's table of names is exactly the model's: a peer that left,
  or fell silent past its timeout, holds nothing.

A step never waits on the network without first checking that the bytes
are already there, so a wrong server fails the test instead of hanging it.
"""

from __future__ import annotations

import itertools
import select
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from punch import Endpoint, Role
from punch._control import ControlChannel
from punch._host import signed_register
from punch._protocol import (
    Challenge,
    ConnectRequest,
    Error,
    Introduction,
    Keepalive,
    Message,
    Registered,
)
from punch._server import RendezvousServer, ServerLimits
from punch.reuse import abort
from tests.helpers import IDENTITY, raw_client

LIMITS = ServerLimits(introductions_per_minute=10_000)  # rate limits have their own tests
CLIENTS = 4
NAMES = ("alice", "bob", "carol")
SETTLE = 0.003  # real seconds of quiet that count as "the server has done its part"

client = st.integers(0, CLIENTS - 1)
pick = st.integers(0, len(NAMES))  # an index into names ordered by the current state
step = st.one_of(
    st.tuples(st.just("register"), pick, pick),
    st.tuples(st.just("connect"), client, pick),
    st.tuples(st.just("open"), client),
    st.tuples(st.just("keepalive"), client),
    st.tuples(st.just("leave"), client, st.booleans()),
    # around both deadlines: 10 s to register, 45 s of silence once registered
    st.tuples(st.just("wait"), st.sampled_from([3, 7, 10, 20, 44, 45, 46])),
)


@attrs.define(eq=False)
class Client:
    """One test-side control connection and what the model knows of it."""

    channel: ControlChannel
    observed: Endpoint  # what the server sees: its srflx candidate
    opened: float
    heard: float  # when the server last received a frame from it
    name: str | None = None
    candidate: Endpoint | None = None  # its one host candidate, unique per registration
    challenge: Challenge | None = None  # the server's first frame, read when it came

    def readable(self) -> bool:
        fd = self.channel.socket.fileno()
        return bool(self.channel._inbox) or bool(select.select([fd], [], [], 0)[0])

    async def receive(self) -> Message | None:
        """The next message, which must already have arrived."""
        assert self.readable(), "the server owed this client a message and sent none"
        return await self.channel.receive()

    async def expect_refusal(self, code: str) -> None:
        """The server's error frame, then its close."""
        reply = await self.receive()
        assert isinstance(reply, Error), reply
        assert reply.code == code
        assert await self.receive() is None


@attrs.define(eq=False)
class Registry:
    """Runs one program's steps and checks each against the model."""

    server: RendezvousServer
    rendezvous: Endpoint
    exits: AsyncExitStack
    clock: trio.testing.MockClock
    clients: dict[int, Client] = attrs.field(factory=dict)
    request_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    serial: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def holder(self, wanted: str) -> Client | None:
        return next((c for c in self.clients.values() if c.name == wanted), None)

    async def open(self, index: int) -> Client:
        if index not in self.clients:
            channel = await self.exits.enter_async_context(
                raw_client(self.rendezvous, f"127.0.0.{10 + index}")
            )
            now = trio.current_time()
            observed = Endpoint.from_sockaddr(channel.socket.getsockname())
            self.clients[index] = client = Client(channel, observed, now, now)
            await self.settle()  # the server has accepted and sent its Challenge
            challenge = await client.receive()
            assert isinstance(challenge, Challenge), challenge
            client.challenge = challenge
        return self.clients[index]

    def names(self, *first: str) -> list[str]:
        """Every name, ``first`` first: how a step's ``pick`` becomes a name."""
        return [*first, *(n for n in NAMES if n not in first)]

    async def register(self, client_pick: int, name_pick: int) -> None:
        """Register a client that has no name yet, mostly with a name nobody holds."""
        idle = [i for i in range(CLIENTS) if i not in self.clients or not self.clients[i].name]
        if not idle:
            return  # a second Register is a protocol error, tested elsewhere
        index = idle[client_pick % len(idle)]
        free = [n for n in NAMES if self.holder(n) is None]
        wanted = self.names(*free)[name_pick % len(NAMES)]
        me = await self.open(index)
        await self.settle()  # the server has accepted before we speak
        candidate = Endpoint(f"10.0.{index}.{next(self.serial) % 250 + 1}", 4000 + index)
        assert me.challenge is not None
        await me.channel.send(signed_register(IDENTITY, me.challenge, wanted, (candidate,)))
        await self.settle()
        if self.holder(wanted) is not None:
            await me.expect_refusal("name-taken")
            await self.forget(index)
            return
        assert await me.receive() == Registered(me.observed)
        me.name, me.candidate, me.heard = wanted, candidate, trio.current_time()

    async def connect(self, index: int, target_pick: int) -> None:
        """Ask for another registered peer, mostly; else an unknown name, or one's own."""
        me = self.clients.get(index)
        if me is None or me.name is None:
            return  # only registered peers may ask (the client state machine says so)
        others = [c.name for c in self.clients.values() if c.name and c is not me]
        target = self.names(*others)[target_pick % len(NAMES)]
        request_id = next(self.request_ids)
        await me.channel.send(ConnectRequest(target, request_id))
        me.heard = trio.current_time()
        await self.settle()
        reply = await me.receive()
        other = self.holder(target)
        if target == me.name:
            assert reply == Error("same-peer", _text(reply), request_id)
        elif other is None:
            assert reply == Error("unknown-peer", _text(reply), request_id)
        else:
            assert isinstance(reply, Introduction), reply
            assert (reply.peer_name, reply.role, reply.request_id) == (
                target,
                Role.INITIATOR,
                request_id,
            )
            assert _endpoints(reply) == {other.observed, other.candidate}
            theirs = await other.receive()
            assert isinstance(theirs, Introduction), theirs
            assert (theirs.peer_name, theirs.role, theirs.request_id) == (
                me.name,
                Role.RESPONDER,
                None,
            )
            assert (theirs.attempt_id, theirs.secret) == (reply.attempt_id, reply.secret)
            assert _endpoints(theirs) == {me.observed, me.candidate}

    async def keepalive(self, index: int) -> None:
        me = self.clients.get(index)
        if me is not None and me.name is not None:
            await me.channel.send(Keepalive())
            me.heard = trio.current_time()

    async def leave(self, index: int, reset: bool) -> None:
        if index in self.clients:
            if reset:
                abort(self.clients[index].channel.socket)
            await self.forget(index)

    async def wait(self, seconds: float) -> None:
        self.clock.jump(seconds)
        await self.settle()
        now = trio.current_time()
        for index, c in sorted(self.clients.items()):
            if c.name is None and now >= c.opened + LIMITS.registration_timeout:
                await c.expect_refusal("registration-timeout")
                await self.forget(index)
            elif c.name is not None and now >= c.heard + LIMITS.idle_timeout:
                await c.expect_refusal("idle-timeout")
                await self.forget(index)

    async def forget(self, index: int) -> None:
        await self.clients.pop(index).channel.stream.aclose()

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked(SETTLE)

    async def check(self) -> None:
        """Nobody has an unexpected message; the server holds exactly the model's names."""
        await self.settle()
        for index, c in self.clients.items():
            assert not c.readable(), f"client {index} ({c.name}) got an unexpected message"
        held = {p.name: (p.observed, p.host_candidates) for p in self.server.peers.values()}
        expected = {c.name: (c.observed, (c.candidate,)) for c in self.clients.values() if c.name}
        assert held == expected


def _text(reply: object) -> str:
    assert isinstance(reply, Error), reply
    return reply.text


def _endpoints(intro: Introduction) -> set[Endpoint | None]:
    return {c.endpoint for c in intro.candidates}


async def run_program(program: list[tuple[Any, ...]]) -> None:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    server = RendezvousServer(LIMITS, on_loopback=True)
    async with trio.open_nursery() as nursery, AsyncExitStack() as exits:
        await nursery.start(server.park_idle)  # registered peers wait parked, as in the binary
        serve = partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        rendezvous = Endpoint.from_sockaddr(listeners[0].socket.getsockname())
        registry = Registry(server, rendezvous, exits, clock)
        for action, *args in program:
            await getattr(registry, action)(*args)
            await registry.check()
        nursery.cancel_scope.cancel()


@settings(max_examples=150)
@given(program=st.lists(step, min_size=12, max_size=40))
def test_registry_follows_the_model(program: list[tuple[Any, ...]]) -> None:
    # time moves only when a step says "wait"; real I/O settles in between
    trio.run(run_program, program, clock=trio.testing.MockClock(rate=0))
