from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from punch import Candidate, CandidateType, Endpoint, PeerStream, Role
from punch._control import ControlChannel
from punch._handshake import HELLO_SIZE, PROOF_SIZE, Handshake
from punch._protocol import Introduction, Register, RendezvousConnection, Side
from punch._race import InboundRouter, Race
from punch._reuse import bind_reusable
from punch._stream import ExactReader


def open_fds() -> int:
    """How many file descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


def introductions(
    initiator_candidates: tuple[Endpoint, ...], responder_candidates: tuple[Endpoint, ...]
) -> tuple[Introduction, Introduction]:
    """Matching introductions, as the rendezvous would send them to both peers.

    ``initiator_candidates`` are where the initiator can be reached (sent to the
    responder), and the other way round.
    """
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)

    def candidates(endpoints: tuple[Endpoint, ...]) -> tuple[Candidate, ...]:
        return tuple(Candidate(CandidateType.HOST, e) for e in endpoints)

    return (
        Introduction(
            "responder", Role.INITIATOR, attempt, secret, candidates(responder_candidates), 1
        ),
        Introduction(
            "initiator", Role.RESPONDER, attempt, secret, candidates(initiator_candidates)
        ),
    )


@asynccontextmanager
async def race_side(bind: Endpoint) -> AsyncIterator[tuple[Endpoint, InboundRouter]]:
    """A port on ``bind`` with its router serving: one side of a race.

    A bound socket holds the port, as a host's control connection does; the
    router listens on it while a route is open.
    """
    with bind_reusable(bind) as holder:
        local = Endpoint.from_sockaddr(holder.getsockname())
        router = InboundRouter(local)
        async with trio.open_nursery() as nursery:
            await nursery.start(router.serve)
            yield local, router
            nursery.cancel_scope.cancel()


async def run_race(router: InboundRouter, race_args: dict[str, Any]) -> PeerStream:
    """Open the route (if the test has not yet), run the race, close the route, as Host does."""
    intro = race_args["introduction"]
    inbound = router.open_route(intro.attempt_id)
    try:
        return await Race(inbound=inbound, **race_args).run()
    finally:
        router.close_route(intro.attempt_id)


async def play_peer(
    stream: trio.abc.Stream, intro: Introduction, *, speak_first: bool
) -> ExactReader:
    """Authenticate ``stream`` as the peer named by ``intro``'s role (test-side handshake)."""
    reader = ExactReader(stream)  # type: ignore[arg-type]
    shake = Handshake(intro.role, intro.attempt_id, intro.secret)
    if speak_first:
        await reader.send(shake.hello())
        shake.receive_hello(await reader.exactly(HELLO_SIZE))
    else:
        shake.receive_hello(await reader.exactly(HELLO_SIZE))
        await reader.send(shake.hello())
    await reader.send(shake.proof())
    shake.verify_proof(await reader.exactly(PROOF_SIZE))
    return reader


@asynccontextmanager
async def raw_client(
    rendezvous: Endpoint, source: str = "127.0.0.1"
) -> AsyncIterator[ControlChannel]:
    """A hand-driven control connection from ``source`` (any 127/8 address, or ``::1``)."""
    sock = trio.socket.socket(Endpoint(source, 0).family)
    try:
        await sock.bind((source, 0))
        await sock.connect(rendezvous.sockaddr())
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as stream:
        yield ControlChannel(stream, sock, RendezvousConnection(Side.CLIENT))


async def register(
    channel: ControlChannel, name: str, *candidates: Endpoint, token: str | None = None
) -> object:
    await channel.send(Register(name, candidates, token))
    return await channel.receive()
