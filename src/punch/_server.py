"""The rendezvous server: a registry of peers and the introductions between them."""

from __future__ import annotations

import logging
import math
import secrets

import attrs
import trio

from . import _reuse
from ._control import ControlChannel
from ._endpoint import Candidate, CandidateType, Endpoint, Role
from ._errors import LocalProtocolError, RemoteProtocolError
from ._protocol import (
    ATTEMPT_ID_BYTES,
    MAX_ERROR_TEXT,
    SECRET_BYTES,
    ConnectRequest,
    Error,
    Introduction,
    Register,
    Registered,
    RendezvousConnection,
    Side,
)

log = logging.getLogger("punch.server")

REGISTRATION_TIMEOUT = 10.0
"""Seconds a new control connection has to complete its Register."""
SEND_TIMEOUT = 5.0
"""Seconds a frame may take to leave; a peer that does not read is dropped."""


@attrs.define(eq=False)
class _Peer:
    name: str
    observed: Endpoint
    host_candidates: tuple[Endpoint, ...]
    channel: ControlChannel

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Server-reflexive first, then host candidates (duplicates dropped)."""
        srflx = Candidate(CandidateType.SERVER_REFLEXIVE, self.observed)
        hosts = (Candidate(CandidateType.HOST, e) for e in self.host_candidates)
        return tuple(dict.fromkeys([srflx, *hosts]))


@attrs.define(eq=False)
class RendezvousServer:
    """The registry behind :func:`serve_rendezvous`; one instance per listening server.

    Args:
        registration_timeout: seconds a connection has to send ``Register``.
    """

    registration_timeout: float = REGISTRATION_TIMEOUT
    peers: dict[str, _Peer] = attrs.field(factory=dict, init=False)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one control connection until it closes; never raises but Cancelled."""
        observed = Endpoint.from_sockaddr(stream.socket.getpeername())
        channel = ControlChannel(stream, RendezvousConnection(Side.SERVER))
        peer: _Peer | None = None
        try:
            peer = await self._register(channel, observed)
            if peer is not None:
                await self._serve(peer)
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", observed, exc)
            await self._refuse(channel, Error(exc.code, str(exc)[:MAX_ERROR_TEXT]))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", observed, exc.__cause__ or exc)
        except Exception:  # one connection's bug must never take the server down
            log.exception("%s: unexpected error, closing this connection", observed)
        finally:
            if peer is not None and self.peers.get(peer.name) is peer:
                del self.peers[peer.name]
                log.info("%s: %r left", observed, peer.name)
            _reuse.abort(stream.socket)

    async def _register(self, channel: ControlChannel, observed: Endpoint) -> _Peer | None:
        with trio.move_on_after(self.registration_timeout):
            message = await channel.receive()
            if message is None:
                return None
            assert isinstance(message, Register)  # the protocol state machine ensures it
            if message.name in self.peers:
                await self._refuse(
                    channel, Error("name-taken", f"{message.name!r} is held by a connected peer")
                )
                return None
            peer = _Peer(message.name, observed, message.candidates, channel)
            self.peers[peer.name] = peer
            await channel.send(Registered(observed))
            log.info(
                "%s: registered %r, host candidates %s",
                observed,
                peer.name,
                ", ".join(map(str, peer.host_candidates)) or "none",
            )
            return peer
        log.info("%s: no registration within %g s, closing", observed, self.registration_timeout)
        await self._refuse(channel, Error("registration-timeout", "no Register in time"))
        return None

    async def _serve(self, peer: _Peer) -> None:
        while (message := await peer.channel.receive()) is not None:
            assert isinstance(message, ConnectRequest)  # the only message left for a client
            await self._introduce(peer, message)

    async def _introduce(self, requester: _Peer, request: ConnectRequest) -> None:
        target = self.peers.get(request.target)
        if request.target == requester.name:
            error = Error("same-peer", "a peer cannot be introduced to itself", request.request_id)
            await requester.channel.send(error)
            return
        if target is None:
            error = Error(
                "unknown-peer", f"{request.target!r} is not registered", request.request_id
            )
            await requester.channel.send(error)
            return
        attempt_id = secrets.token_bytes(ATTEMPT_ID_BYTES)
        secret = secrets.token_bytes(SECRET_BYTES)
        to_requester = Introduction(
            target.name, Role.INITIATOR, attempt_id, secret, target.candidates, request.request_id
        )
        to_target = Introduction(
            requester.name, Role.RESPONDER, attempt_id, secret, requester.candidates
        )
        log.info(
            "introducing %r (%s) to %r (%s), attempt %s",
            requester.name,
            requester.observed,
            target.name,
            target.observed,
            attempt_id.hex()[:8],
        )
        async with trio.open_nursery() as nursery:  # both at the same moment
            nursery.start_soon(self._deliver, requester, to_requester)
            nursery.start_soon(self._deliver, target, to_target)

    async def _deliver(self, peer: _Peer, message: Introduction) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                await peer.channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%r: introduction not delivered: %s", peer.name, exc.__cause__ or exc)
                _reuse.abort(peer.channel.stream.socket)
        if scope.cancelled_caught:
            log.warning("%r: not reading; dropped after %g s", peer.name, SEND_TIMEOUT)
            _reuse.abort(peer.channel.stream.socket)

    @staticmethod
    async def _refuse(channel: ControlChannel, error: Error) -> None:
        """Best effort: tell the peer why, then the caller closes."""
        with trio.move_on_after(1.0):
            try:
                await channel.send(error)
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                pass


async def serve_rendezvous(
    host: str = "0.0.0.0",
    port: int = 0,
    *,
    registration_timeout: float = REGISTRATION_TIMEOUT,
    task_status: trio.TaskStatus[Endpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a rendezvous server until cancelled.

    Follows trio's ``nursery.start`` protocol::

        bound = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)

    Args:
        host: IP address to listen on (default all IPv4 interfaces).
        port: TCP port, 0..65535; 0 lets the kernel choose.
        registration_timeout: seconds (> 0) a connection has to register.
        task_status: receives the bound :class:`Endpoint` once listening.

    Raises:
        TypeError, ValueError: a bad argument.
        OSError: the listening socket could not be opened (``EADDRINUSE``…).
    """
    bind = Endpoint(host, port)  # validates both
    if not 0 < registration_timeout < math.inf:
        raise ValueError(f"registration_timeout must be seconds > 0, not {registration_timeout!r}")
    server = RendezvousServer(registration_timeout)
    listeners = await trio.open_tcp_listeners(bind.port, host=bind.ip)
    bound = Endpoint.from_sockaddr(listeners[0].socket.getsockname())
    log.info("rendezvous listening on %s", bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(bound)
