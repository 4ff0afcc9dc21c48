from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from netns.lab import Lab

from punch import Candidate, CandidateType, Endpoint, PeerStream, Role
from punch._control import ControlChannel
from punch._handshake import HELLO_SIZE, NOMINATION_SIZE, Handshake, Stage
from punch._host import signed_register
from punch._identity import Identity
from punch._protocol import Challenge, Error, Introduction, RendezvousConnection, Side
from punch._race import InboundRouter, Race
from punch._stream import ExactReader
from punch.reuse import TCP_RTO_MAX_MS, TCP_RTO_MIN_US, TCP_THIN_LINEAR_TIMEOUTS, bind_reusable


def open_fds() -> int:
    """How many file descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


def rto_min_us(sock: trio.socket.SocketType) -> int | None:
    """``TCP_RTO_MIN_US`` of ``sock``, None on a kernel without it (before Linux 6.15)."""
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US))
    except OSError:
        return None


def rto_max_ms(sock: trio.socket.SocketType) -> int | None:
    """``TCP_RTO_MAX_MS`` of ``sock``, None on a kernel without it (before Linux 6.15)."""
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS))
    except OSError:
        return None


def thin_linear(sock: trio.socket.SocketType) -> int:
    """``TCP_THIN_LINEAR_TIMEOUTS`` of ``sock``: 1 while its timeouts do not double."""
    return int(sock.getsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS))


def probe_in_namespace(name: str, ruleset: str, module: str, *args: str) -> Any:
    """Run ``python -m module args`` inside a fresh namespace (root) whose nft
    ``ruleset`` is loaded first, and return the JSON line it prints."""
    with Lab() as lab:
        ns = lab.ns(name)
        lab.sh(ns, "nft", "-f", "-", stdin=ruleset)
        probe = subprocess.run(
            [*lab.exec_prefix(ns), sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[1],
        )
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout)


TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_CLOSE = 1, 2, 3, 7  # include/net/tcp_states.h


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, tcp(7) ``TCP_INFO``)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def nonblocking_client(host: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``host`` on a port of the kernel's choice.

    On loopback a SYN is delivered within ``connect()``, so right after it the
    socket is ESTABLISHED if a listener answered, and still in SYN_SENT if not.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


IDENTITY = Identity.generate()
"""One key for the tests' hand-made peers (its certificate fills introductions)."""


def introductions(
    initiator_candidates: tuple[Endpoint, ...], responder_candidates: tuple[Endpoint, ...]
) -> tuple[Introduction, Introduction]:
    """Matching introductions, as the rendezvous would send them to both peers.

    ``initiator_candidates`` are where the initiator can be reached (sent to the
    responder), and the other way round. Both carry :data:`IDENTITY`'s certificate.
    """
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)

    def candidates(endpoints: tuple[Endpoint, ...]) -> tuple[Candidate, ...]:
        return tuple(Candidate(CandidateType.HOST, e) for e in endpoints)

    return (
        Introduction(
            "responder",
            Role.INITIATOR,
            attempt,
            secret,
            candidates(responder_candidates),
            IDENTITY.certificate,
            1,
        ),
        Introduction(
            "initiator",
            Role.RESPONDER,
            attempt,
            secret,
            candidates(initiator_candidates),
            IDENTITY.certificate,
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
        return await Race(inbound=inbound, router=router, **race_args).run()
    finally:
        router.close_route(intro.attempt_id)


@attrs.define
class Player:
    """The test's side of a handshake on one stream: its reader and its :class:`Handshake`."""

    reader: ExactReader
    shake: Handshake

    async def nominate(self) -> None:
        """As the initiator: nominate this stream (and hold it)."""
        await self.reader.send(self.shake.nominate())

    async def nominated(self) -> None:
        """As the responder: read the initiator's Nomination and check it.

        Raises:
            HandshakeError: it is not a valid Nomination (or the stream closed first).
        """
        self.shake.receive(await self.reader.exactly(NOMINATION_SIZE))


async def play_peer(
    stream: trio.abc.Stream,
    intro: Introduction,
    *,
    hold: trio.Event | None = None,
    client_hello: bytes = b"",
) -> Player:
    """Authenticate ``stream`` as the peer named by ``intro``'s role (test-side handshake).

    Both sides speak at once, as the race does; returns once the peer is
    authenticated (a responder has sent its Proof and read the Hello, and any
    ClientHello, and awaits the Nomination). ``hold``: what follows our Hello
    (a responder's Proof, an initiator's ``client_hello``) waits for it.
    """
    reader = ExactReader(stream)  # type: ignore[arg-type]
    shake = Handshake(intro.role, intro.attempt_id, intro.secret)
    opening = shake.opening(client_hello)
    await reader.send(opening[:HELLO_SIZE])
    if hold is not None:
        await hold.wait()
    await reader.send(opening[HELLO_SIZE:])
    while shake.expecting and shake.stage is not Stage.NOMINATION:
        shake.receive(await reader.exactly(shake.expecting))
    return Player(reader, shake)


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
    channel: ControlChannel,
    name: str,
    *candidates: Endpoint,
    token: str | None = None,
    identity: Identity = IDENTITY,
) -> object:
    """Read the server's Challenge, send a signed Register, return the server's answer."""
    await send_register(channel, name, *candidates, token=token, identity=identity)
    return await channel.receive()


async def send_register(
    channel: ControlChannel,
    name: str,
    *candidates: Endpoint,
    token: str | None = None,
    identity: Identity = IDENTITY,
) -> None:
    """Read the server's Challenge and send a Register signed over it."""
    challenge = await channel.receive()
    assert isinstance(challenge, Challenge), challenge
    await channel.send(signed_register(identity, challenge, name, candidates, token))


async def refused_with(channel: ControlChannel) -> str:
    """The code of the Error that ends this connection (after the Challenge, if it
    was not read yet); asserts the close follows."""
    message = await channel.receive()
    if isinstance(message, Challenge):
        message = await channel.receive()
    assert isinstance(message, Error), message
    assert await channel.receive() is None  # closed after the error
    return message.code
