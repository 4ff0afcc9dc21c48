"""A host: one local port for its listener, its control connection and every dial."""

from __future__ import annotations

import errno
import itertools
import logging
import random
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from . import _secure, reuse
from ._birthday import failure_hint, needs_own_facts
from ._candidates import interface_addresses
from ._control import ControlChannel, connect_control
from ._endpoint import CandidateType, Endpoint, Role, as_endpoint
from ._errors import NameTaken, PunchFailed, RemoteProtocolError, RendezvousError, ReuseUnavailable
from ._handover import Handover
from ._identity import Identity, check_peer_id
from ._nat import NatFacts
from ._natcheck import REPORT_TIMEOUT, registration_facts
from ._protocol import (
    MAX_CANDIDATES,
    Challenge,
    ConnectRequest,
    Error,
    Introduction,
    Keepalive,
    Register,
    Registered,
    Report,
    check_name,
    registration_transcript,
)
from ._race import (
    DEFAULT_PACING,
    DEFAULT_RELAY_STAGGER,
    DEFAULT_STAGGER,
    DEFAULT_TIMEOUT,
    InboundRouter,
    PunchOptions,
    Race,
    RelayMode,
)
from ._stream import PeerStream

log = logging.getLogger("punch.host")

BACKOFF_FIRST = 0.5
"""Seconds: the first reconnect to a lost rendezvous comes within this (jittered)."""
BACKOFF_MAX = 30.0
"""Seconds: the cap the reconnect delays double up to."""
KEEPALIVES_PER_IDLE_TIMEOUT = 3
"""Keepalives sent within the idle timeout the server announced in
``Registered`` (every 15 s against the default 45 s): two lost ones are survived."""

UPGRADE_AFTER = (5.0, 30.0, 300.0)
"""Seconds between a relayed stream's tries to move to a direct path (issue 17):
5 s after it was made, 30 s after that, then every 300 s for its life."""
ACCEPT_QUEUE = 16
"""Punched streams held for :meth:`Host.accept` before more are refused."""

_Reply = Introduction | Error | RendezvousError
_EndpointLike = Endpoint | tuple[str, int] | str

CONTROL_STAGGER = 0.25
"""Seconds between the starts of connects to the rendezvous's endpoints, in order
(RFC 8305 §5's recommended connection attempt delay)."""
SAME_PORT_TRIES = 8
"""Times :func:`open_host` picks a new port when the other family has it taken."""


def backoff(rng: random.Random | None = None) -> Iterator[float]:
    """Seconds to wait before each reconnect: capped exponential backoff, equal jitter.

    The cap starts at :data:`BACKOFF_FIRST` and doubles up to :data:`BACKOFF_MAX`;
    each delay is drawn from [cap / 2, cap], so a crowd of hosts that lost the
    same rendezvous does not come back in step (AWS Architecture Blog,
    "Exponential Backoff And Jitter", 2015). Endless.
    """
    rng = rng or random.Random()
    cap = BACKOFF_FIRST
    while True:
        yield cap / 2 + rng.uniform(0, cap / 2)
        cap = min(cap * 2, BACKOFF_MAX)


@attrs.frozen
class _Registration:
    """How to reach the rendezvous and register: once, and again after it was lost."""

    name: str
    identity: Identity
    locals: tuple[Endpoint, ...]
    servers: tuple[Endpoint, ...]
    timeout: float
    token: str | None
    ssl_context: ssl.SSLContext | None
    hostname: str | None

    async def register(
        self,
    ) -> tuple[ControlChannel, Registered, tuple[Endpoint, ...], Endpoint]:
        """A new control connection to the first of :attr:`servers` that we reach
        from the local endpoint of its family, registered under :attr:`name`.

        The connects are happy eyeballs (RFC 8305 §5): to each server in order,
        the next one :data:`CONTROL_STAGGER` seconds after the one before, or as
        soon as it fails; the first connected is kept, the rest are closed. So a
        family whose path drops everything costs 0.25 s, not the timeout.

        Returns:
            the channel, the server's ``Registered``, the host candidates we
            registered (first the local endpoint the OS chose to reach the
            server, then our other family's interface addresses on its port),
            and the server endpoint we registered with.

        Raises:
            RendezvousError: as :func:`open_host` while registering
                (``unreachable`` when no server could be reached).
            OSError: a local endpoint cannot be bound.
        """
        held = {local.family: local for local in self.locals}
        routes = [(held[s.family], s) for s in self.servers if s.family in held]
        channel, server = await self._connect_first(routes)
        try:
            chosen = Endpoint.from_sockaddr(channel.socket.getsockname())
            candidates = (chosen, *self._other_host_candidates(chosen))[:MAX_CANDIDATES]
            registered = await _register(channel, self, candidates)
        except BaseException:
            reuse.abort(channel.socket)
            raise
        return channel, registered, candidates, server

    async def _connect_first(
        self, routes: list[tuple[Endpoint, Endpoint]]
    ) -> tuple[ControlChannel, Endpoint]:
        """The first of ``routes`` (local, server) to connect, staggered (see :meth:`register`).

        Raises:
            RendezvousError: ``unreachable``, naming each server's error.
        """
        won: list[tuple[ControlChannel, Endpoint]] = []
        errors: list[str] = []

        async def attempt(local: Endpoint, server: Endpoint, failed: trio.Event) -> None:
            try:
                channel = await connect_control(
                    local, server, self.timeout, self.ssl_context, self.hostname or server.ip
                )
            except RendezvousError as exc:
                log.info("%s", exc.detail)
                errors.append(exc.detail)
                failed.set()
                return
            if won:  # another got there first
                reuse.abort(channel.socket)
                return
            won.append((channel, server))
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for local, server in routes:
                failed = trio.Event()
                nursery.start_soon(attempt, local, server, failed)
                with trio.move_on_after(CONTROL_STAGGER):
                    await failed.wait()
        if not won:
            raise RendezvousError("unreachable", "; ".join(errors) or "no rendezvous to reach")
        return won[0]

    def legs(self, registered_at: Endpoint) -> list[_Registration]:
        """For each other family we hold, with a server of that family: its registration."""
        legs = []
        for local in self.locals:
            servers = tuple(s for s in self.servers if s.family == local.family)
            if local.family != registered_at.family and servers:
                legs.append(attrs.evolve(self, locals=(local,), servers=servers))
        return legs

    def _other_host_candidates(self, chosen: Endpoint) -> list[Endpoint]:
        """Our endpoints in the families the control connection does not use."""
        found = []
        for local in self.locals:
            if local.family == chosen.family:
                continue
            if local.address.is_unspecified:
                found += [Endpoint(str(a), local.port) for a in interface_addresses(local.family)]
            else:
                found.append(local)
        return found


@attrs.define(eq=False)
class Host:
    """One local ip:port holding a rendezvous registration, races, and while one runs, a listener.

    Made by :func:`open_host`; see there for the arguments.

    Attributes:
        name: our registered name.
        identity: our :class:`~punch.Identity` (its key is registered with the name).
        local: our bound endpoint (the port every socket shares) in the first family.
        host_candidate: the local endpoint the OS chose to reach the rendezvous.
        observed: our server-reflexive endpoint, as the rendezvous saw it
            (after a reconnect, as it sees us now).
        options: the validated :class:`PunchOptions` (timeout, pacing, encrypt, stagger).
        locals: every bound endpoint, one per family (IPv4 and IPv6 on one
            port number for a dual-stack host), :attr:`local` first.
        host_candidates: the host candidates we registered (:attr:`host_candidate`
            first, then the other family's interface addresses on its port).
        rendezvous: the server endpoint we registered with (the first of
            :func:`open_host`'s that we reached).
        nat: what our NAT did to two probes of the rendezvous's probe port
            just after registering (:class:`~punch._nat.NatFacts`; the
            rendezvous passes them to our peers in their introductions);
            ``None`` until measured (:meth:`measured_nat` waits), and for good
            when the rendezvous has no probe port, was reached over IPv6, or
            ``open_host(probe_port=0)`` said not to probe.
    """

    name: str
    identity: Identity
    local: Endpoint
    host_candidate: Endpoint
    observed: Endpoint
    options: PunchOptions
    locals: tuple[Endpoint, ...]
    host_candidates: tuple[Endpoint, ...]
    rendezvous: Endpoint
    _channel: ControlChannel
    _router: InboundRouter
    _registration: _Registration
    _idle_timeout: float
    _requests: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _waiters: dict[int, trio.MemorySendChannel[_Reply]] = attrs.field(factory=dict, init=False)
    _introduced_at: dict[bytes, float] = attrs.field(factory=dict, init=False)
    """Attempt ID -> trio time its introduction arrived, until its race starts."""
    _closed: RendezvousError | None = attrs.field(default=None, init=False)
    nat: NatFacts | None = attrs.field(default=None, init=False)
    _nat_measured: trio.Event = attrs.field(factory=trio.Event, init=False)
    _legs: dict[socket.AddressFamily, ControlChannel] = attrs.field(factory=dict, init=False)
    _leg_observed: dict[socket.AddressFamily, Endpoint] = attrs.field(factory=dict, init=False)
    _legs_tried: trio.Event = attrs.field(factory=trio.Event, init=False)
    _registered: trio.Event = attrs.field(factory=trio.Event, init=False)
    _accepted_send: trio.MemorySendChannel[PeerStream | OSError] = attrs.field(init=False)
    _accepted: trio.MemoryReceiveChannel[PeerStream | OSError] = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    """The host's own, for background work: set by :func:`open_host`."""
    _relayed: weakref.WeakValueDictionary[bytes, PeerStream] = attrs.field(
        factory=weakref.WeakValueDictionary, init=False
    )
    """Attempt ID -> our relayed streams not yet moved, for their upgrades."""
    _observed_changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set (and replaced) when our server-reflexive endpoint changes: a reason to
    try a relayed stream's upgrade at once."""

    def __attrs_post_init__(self) -> None:
        self._registered.set()
        self._accepted_send, self._accepted = trio.open_memory_channel[PeerStream | OSError](
            ACCEPT_QUEUE
        )

    async def wait_registered(self) -> None:
        """Return once we are registered: at once, or, while the host is reconnecting
        to a lost rendezvous, when it has registered again (bound it with
        ``trio.move_on_after``: a rendezvous may stay away)."""
        await self._registered.wait()

    @property
    def server_reflexive(self) -> tuple[Endpoint, ...]:
        """Our server-reflexive endpoints: :attr:`observed`, then, for a dual-stack
        host whose rendezvous is reachable on both families, the one the rendezvous
        sees over the other family (registered in the background, see :func:`open_host`)."""
        return (self.observed, *self._leg_observed.values())

    @property
    def own_endpoints(self) -> frozenset[Endpoint]:
        """Every endpoint that is us: never dialled (self-dial guard)."""
        return frozenset({*self.locals, *self.host_candidates, *self.server_reflexive})

    async def connect(
        self,
        peer: str,
        *,
        timeout: float | None = None,
        peer_id: str | None = None,
        relay: RelayMode | str | None = None,
    ) -> PeerStream:
        """Punch a direct connection to ``peer``, as the initiator; or, where none
        comes, a relayed one (``relay``).

        Args:
            peer: the peer's registered name (1-64 of ``[A-Za-z0-9._-]``).
            timeout: seconds (> 0) for the introduction, again for the punch
                itself, and again for TLS; default ``options.timeout``.
            peer_id: the peer ID ``peer`` must prove (32 of ``[a-z2-7]``, its
                :attr:`punch.Identity.peer_id`): then a rendezvous that lies
                about the peer's key cannot stand in for it. Needs encryption.
            relay: ``"fallback"``, ``"never"`` or ``"only"`` (:class:`RelayMode`);
                default ``options.relay`` (``"fallback"``): the relayed stream
                competes from ``options.relay_stagger`` seconds (2 s) on, when
                the rendezvous has a relay. :attr:`PeerStream.path` tells which won.

        Returns:
            the authenticated :class:`PeerStream` both sides keep, TLS-encrypted
            unless ``options.encrypt`` is off.

        Raises:
            TypeError, ValueError: a bad ``peer``, ``timeout``, ``peer_id`` or ``relay``,
                or ``peer_id`` on a host that does not encrypt.
            PeerVerificationError: the introduced key is not ``peer_id``'s,
                the peer's TLS certificate is not the key it registered, or the
                peer does not agree on encryption.
            RendezvousError: ``unknown-peer``, ``same-peer``, ``timeout`` (no
                answer in time), or ``closed`` (the control connection is gone).
            SelfDialError: every candidate of ``peer`` is one of our own endpoints.
            PunchFailed: no path worked within the timeout; the cause groups
                each candidate's error.
        """
        check_name(peer)
        if peer_id is not None:
            check_peer_id(peer_id)
            if not self.options.encrypt:
                raise ValueError("peer_id needs encrypt=True: only TLS proves a peer's key")
        options = self.options if timeout is None else attrs.evolve(self.options, timeout=timeout)
        if relay is not None:
            options = attrs.evolve(options, relay=relay)
        timeout = options.timeout
        if self._closed is not None and not self._legs:
            raise RendezvousError(self._closed.code, self._closed.detail)
        if self.observed.port != self.host_candidate.port:
            # A NAT that moved our port may map per destination and allocate in
            # sequence: the peer predicts our next port from our report, so the
            # report goes first (two round trips, once; a port-keeping NAT waits not)
            with trio.move_on_after(REPORT_TIMEOUT):
                await self._nat_measured.wait()
        introduction = await self._introduced(ConnectRequest(peer, 0, options.relay_delay), timeout)
        # the punch has its own deadline, outside the wait for the introduction
        stream = await self._race(introduction, options, peer_id)
        fallback = options.relay is RelayMode.FALLBACK
        if stream.handover is not None and fallback and self._nursery is not None:
            self._nursery.start_soon(self._keep_upgrading, stream)
        return stream

    async def _introduced(self, request: ConnectRequest, timeout: float) -> Introduction:
        """Send ``request`` (under a request ID of ours) and wait ``timeout`` s for its
        introduction.

        Raises:
            RendezvousError: refused, no answer in time, or the connection is gone.
        """
        peer = request.target
        request_id = next(self._requests)
        reply: _Reply | None = None
        send, receive = trio.open_memory_channel[_Reply](1)
        self._waiters[request_id] = send
        try:
            try:
                await self._live_channel().send(attrs.evolve(request, request_id=request_id))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise RendezvousError("closed", "control connection lost") from exc
            with trio.move_on_after(timeout), self._router.listen_meanwhile():
                reply = await receive.receive()
            if reply is None:
                raise RendezvousError(
                    "timeout", f"no introduction to {peer!r} within {timeout:g} s"
                )
            if isinstance(reply, RendezvousError):
                raise RendezvousError(reply.code, reply.detail) from reply
            if isinstance(reply, Error):
                raise RendezvousError(reply.code, reply.text)
            return reply
        finally:
            del self._waiters[request_id]
            try:  # an introduction we will not act on: close its route
                unread = receive.receive_nowait()
                if isinstance(unread, Introduction):
                    self._drop_upgrade_syns(unread, False)
                    self._router.close_route(unread.attempt_id)
                    self._introduced_at.pop(unread.attempt_id, None)
            except trio.WouldBlock:
                pass

    async def upgrade(self, stream: PeerStream) -> bool:
        """Try once to move a relayed stream of ours to a direct connection, live.

        A punch like :meth:`connect`'s (no relay, no new TLS), for ``stream``'s
        peer; if it nominates a direct connection, both sides move the stream
        onto it, bytes in order, nothing lost or repeated, TLS unbroken
        (:mod:`punch._handover`), and the relayed connection is closed.
        :func:`open_host` runs this by itself for a stream :meth:`connect`
        made relayed in ``fallback``: 5 s after, 30 s after that, then every
        300 s (:data:`UPGRADE_AFTER`), and at once when our server-reflexive
        endpoint changes.

        Args:
            stream: a relayed :class:`PeerStream` of this host's, as the
                initiator (the side that nominates moves it).

        Returns:
            True once it moved (:attr:`PeerStream.moved` is set); False when the
            punch found no direct path (its reasons are logged), or the stream
            was closed meanwhile (the new connection is closed too).

        Raises:
            ValueError: not a relayed stream of ours as its initiator, or moved already.
        """
        handover = stream.handover
        if handover is None or handover.moved or stream.role is not Role.INITIATOR:
            raise ValueError("only a relayed stream, not moved yet, moves; its initiator moves it")
        if self._relayed.get(stream.attempt_id) is not stream:
            raise ValueError("not a stream of this host's")
        request = ConnectRequest(stream.peer_name, 0, upgrade=stream.attempt_id)
        handover.begin()
        try:
            introduction = await self._introduced(request, self.options.timeout)
        except OSError as exc:
            handover.end()
            log.info("%r: still relayed: %s", stream.peer_name, exc)
            return False
        return await self._punch_and_move(stream, handover, introduction)

    async def _punch_and_move(
        self, stream: PeerStream, handover: Handover, introduction: Introduction
    ) -> bool:
        """Either side of an upgrade, once its introduction is here (``handover`` begun):
        the punch (no relay, no new TLS), then the move; False if either did not happen."""
        options = attrs.evolve(self.options, relay=RelayMode.NEVER, encrypt=False)
        try:
            direct = await self._race(introduction, options)
        except OSError as exc:
            log.info("%r: still relayed: %s", stream.peer_name, exc)
            return False
        finally:
            self._drop_upgrade_syns(introduction, False)
            if not handover.moved:
                handover.end()
        return await self._move(stream, direct)

    async def _move(self, stream: PeerStream, direct: PeerStream) -> bool:
        """Move ``stream`` onto ``direct``; False when it was closed meanwhile (then
        ``direct`` is closed too: nobody's)."""
        self._relayed.pop(stream.attempt_id, None)
        try:
            await stream.move_to(direct)
        except trio.ClosedResourceError:
            log.info("%r: closed before it could move", stream.peer_name)
            return False
        log.warning(
            "%r: moved from the relay to a direct connection %s -> %s",
            stream.peer_name,
            stream.local,
            stream.remote,
        )
        return True

    def _drop_upgrade_syns(self, introduction: Introduction, drop: bool) -> None:
        """An upgrade punch's: our listener drops the peer's SYNs from the moment its
        introduction arrives (``drop``) until its race ends, not only from our first
        dial as in a first punch. Our NAT may still track our SYNs of the punch that
        ended relayed, so the peer's SYN can reach us before our own leaves; answered
        by the listener, its connection would hold the 4-tuple (``EADDRNOTAVAIL``)."""
        if introduction.upgrade is None:
            return
        for candidate in introduction.candidates:
            if candidate.type is CandidateType.SERVER_REFLEXIVE:
                if drop:
                    self._router.drop_syns_from(candidate.endpoint)
                else:
                    self._router.stop_dropping_syns_from(candidate.endpoint)

    async def _keep_upgrading(self, stream: PeerStream) -> None:
        """Background: :meth:`upgrade` on :data:`UPGRADE_AFTER`'s schedule until the
        stream moves or closes. Never raises."""
        for delay in itertools.chain(UPGRADE_AFTER, itertools.repeat(UPGRADE_AFTER[-1])):
            with trio.move_on_after(delay):
                await self._observed_changed.wait()
            if stream.socket.fileno() < 0 or stream.moved.is_set():
                return
            try:
                if await self.upgrade(stream):
                    return
            except ValueError:
                return

    async def _respond_upgrade(self, introduction: Introduction) -> None:
        """The responder's side of an upgrade punch (see :meth:`upgrade`)."""
        stream = self._relayed.get(introduction.upgrade or b"")
        handover = stream.handover if stream is not None else None
        if (
            stream is None
            or handover is None
            or handover.moved
            or stream.role is not Role.RESPONDER
            or stream.peer_name != introduction.peer_name
        ):
            log.info("%r: an upgrade for no relayed stream of ours", introduction.peer_name)
            self._drop_upgrade_syns(introduction, False)
            self._router.close_route(introduction.attempt_id)
            self._introduced_at.pop(introduction.attempt_id, None)
            return
        handover.begin()
        await self._punch_and_move(stream, handover, introduction)

    async def accept(self) -> PeerStream:
        """The next inbound punch, as the responder: its stream, or why it failed.

        A punch starts as soon as its introduction arrives, whether or not
        ``accept`` is waiting; up to :data:`ACCEPT_QUEUE` outcomes wait here
        (a stream beyond that is closed). Call ``accept`` again after an error
        to wait for the next peer.

        Raises:
            PunchFailed: an inbound punch found no path within ``options.timeout``;
                the cause groups each candidate's error.
            SelfDialError: an inbound punch offered only our own endpoints.
            RendezvousError: ``closed``: the host is closing. (A lost rendezvous
                does not end ``accept``: the host registers again, see
                :func:`open_host`, and inbound punches resume.)
        """
        try:
            outcome = await self._accepted.receive()
        except trio.EndOfChannel:
            closed = self._closed or RendezvousError("closed", "host closed")
            raise RendezvousError(closed.code, closed.detail) from None
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    async def _race(
        self, introduction: Introduction, options: PunchOptions, expected: str | None = None
    ) -> PeerStream:
        """Run the race, then TLS; the route was opened by :meth:`_dispatch` and closes here."""
        inbound = self._router.open_route(introduction.attempt_id)
        introduced_at = self._introduced_at.pop(introduction.attempt_id, None)
        try:
            if expected is not None:  # a lying rendezvous is caught before any SYN
                _secure.introduced_peer_id(introduction, expected)
            own_nat = await self._nat_for(introduction)
            race = Race(
                introduction,
                self.local,
                inbound,
                own=self.own_endpoints,
                options=options,
                tls=_secure.race_context(self.identity, introduction, options.encrypt),
                other_locals=self.locals[1:],
                router=self._router,
                introduced_at=introduced_at,
                own_nat=own_nat,
                prime_first=introduction.upgrade is not None,
            )
            stream = await race.run()
        except PunchFailed as exc:
            hint = self._hint(introduction)
            if hint is None:
                raise
            raise PunchFailed(
                f"{exc}; hint: {hint}",
                attempts=exc.attempts,
                authentication_failed=exc.authentication_failed,
                probes=exc.probes,
            ) from exc.__cause__
        finally:
            self._router.close_route(introduction.attempt_id)
        if stream.handover is not None:
            self._relayed[stream.attempt_id] = stream
        if options.encrypt:
            await _secure.encrypt(stream, self.identity, introduction, expected, options.timeout)
        return stream

    async def _nat_for(self, introduction: Introduction) -> NatFacts | None:
        """Our NAT's facts for a race (:attr:`nat`): None when the rendezvous saw one
        of our own addresses (no NAT: a birthday punch's probes reach our listener,
        so we never probe); when the peer's NAT calls for a birthday punch and ours
        is not measured yet, waits for it first (two round trips to the rendezvous,
        at most :data:`~punch._natcheck.REPORT_TIMEOUT` s, counted in the punch)."""
        if self.observed.address in {e.address for e in self.host_candidates}:
            return None
        if self.nat is None and needs_own_facts(introduction.peer_nat):
            with trio.move_on_after(REPORT_TIMEOUT):
                await self._nat_measured.wait()
        return self.nat

    def _hint(self, introduction: Introduction) -> str | None:
        """Why a failed punch may have had no direct path: a NAT that maps each
        destination to a new port (RFC 4787 §4.1), as the probes found it."""
        hint = failure_hint(self.nat, introduction.peer_nat, introduction.peer_name)
        if hint is not None:
            return hint
        if self.nat is None and self.observed.port != self.host_candidate.port:
            return (
                f"the rendezvous saw us at port {self.observed.port}, not our port "
                f"{self.host_candidate.port}: this NAT does not preserve ports and may map each "
                "destination to a new port (endpoint-dependent mapping); run 'punch natcheck'"
            )
        return None

    async def _respond(self, introduction: Introduction) -> None:
        outcome: PeerStream | OSError
        try:
            outcome = await self._race(introduction, self.options)
        except OSError as exc:
            log.warning("inbound punch from %r failed: %s", introduction.peer_name, exc)
            outcome = exc
        try:
            self._accepted_send.send_nowait(outcome)
        except (trio.WouldBlock, trio.ClosedResourceError) as exc:
            # Closed: the host is closing (open_host's exit). A race whose own deadline
            # fell as the host was cancelled ends without a checkpoint, so it gets here
            # after _close_unaccepted; nobody will accept its outcome either.
            full = isinstance(exc, trio.WouldBlock)
            why = f"accept queue full ({ACCEPT_QUEUE})" if full else "host closing"
            log.warning("%s: dropping %r", why, outcome)
            if isinstance(outcome, PeerStream):
                reuse.abort(outcome.socket)

    async def measured_nat(self) -> NatFacts | None:
        """:attr:`nat`, once the probes after registering are done (they take two
        round trips to the rendezvous, at most
        :data:`~punch._natcheck.REPORT_TIMEOUT` s): ``None`` if they found nothing."""
        await self._nat_measured.wait()
        return self.nat

    async def _report_nat(self, probe_port: int | None) -> None:
        """Measure our NAT on the rendezvous's probe port and tell the rendezvous
        (``Report``), once; never raises."""
        try:
            # an IPv6 path has no NAT to measure (RFC 6092 firewalls at most)
            if probe_port != 0 and self.rendezvous.family == socket.AF_INET:
                await self._measure_and_report(probe_port)
        finally:
            self._nat_measured.set()

    async def _measure_and_report(self, probe_port: int | None) -> None:
        channel = self._channel
        try:
            local = Endpoint.from_sockaddr(channel.socket.getsockname())
        except OSError:
            return
        facts = await registration_facts(local, self.observed, self.rendezvous, probe_port)
        if facts is None:
            return
        self.nat = facts
        log.info("our NAT: %s (ports %s)", facts, " ".join(map(str, facts.ports)))
        try:
            await channel.send(Report(facts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the registration is gone; its successor measures nothing new

    async def _run_registrations(self, legs: Iterable[_Registration]) -> None:
        """Our registration (:meth:`_run_control`) and one :meth:`_run_leg` per other
        family; the punches they start as responder run here too."""
        legs = tuple(legs)
        if not legs:
            self._legs_tried.set()
        async with trio.open_nursery() as responders:
            responders.start_soon(self._run_control, responders)
            for leg in legs:
                responders.start_soon(self._run_leg, leg, responders)

    def _live_channel(self) -> ControlChannel:
        """Our control connection, or while it is lost, another family's."""
        if self._closed is None or not self._legs:
            return self._channel
        return next(iter(self._legs.values()))

    async def _run_control(self, responders: trio.Nursery) -> None:
        """Read the control connection; when it ends, reconnect. Punches under way go on."""
        while True:
            self._closed = await self._hold(self._channel, self._idle_timeout, responders)
            self._registered = trio.Event()
            log.warning("%s; reconnecting to the rendezvous", self._closed)
            for request_id in list(self._waiters):
                self._reply(request_id, self._closed)
            reuse.abort(self._channel.socket)  # frees the 4-tuple for the next one
            await self._reconnect()

    async def _run_leg(self, registration: _Registration, responders: trio.Nursery) -> None:
        """Hold a second registration of our name, over the other family (the same
        key: the rendezvous adds its server-reflexive endpoint to ours), with
        keepalives, and register it again with :func:`backoff` whenever it is
        lost or refused. Best effort: the host works without it."""
        family = registration.locals[0].family
        label = registration.locals[0].family_name
        delays = backoff()
        while True:
            try:
                channel, registered, _, server = await registration.register()
            except (RendezvousError, OSError) as exc:
                log.info("%s registration at the rendezvous failed: %s", label, exc)
                self._legs_tried.set()
                await trio.sleep(next(delays))
                continue
            delays = backoff()
            self._legs[family], self._leg_observed[family] = channel, registered.observed
            log.info(
                "registered %r over %s too, at %s: server-reflexive %s",
                self.name,
                label,
                server,
                registered.observed,
            )
            self._legs_tried.set()
            try:
                ended = await self._hold(channel, registered.idle_timeout, responders)
            finally:
                del self._legs[family], self._leg_observed[family]
                reuse.abort(channel.socket)
            log.info("%s registration lost: %s; registering again", label, ended)
            await trio.sleep(next(delays))

    async def _hold(
        self, channel: ControlChannel, idle_timeout: float, responders: trio.Nursery
    ) -> RendezvousError:
        """Keep ``channel`` alive (:func:`_keep_alive`) and read it (:meth:`_read_control`)
        until it ends; say how it ended."""
        async with trio.open_nursery() as keeping:
            keeping.start_soon(_keep_alive, channel, idle_timeout)
            ended = await self._read_control(channel, responders)
            keeping.cancel_scope.cancel()
        return ended

    async def _read_control(
        self, channel: ControlChannel, responders: trio.Nursery
    ) -> RendezvousError:
        """Dispatch what the rendezvous sends until the connection ends; say how it ended."""
        farewell = None
        try:
            while (message := await channel.receive()) is not None:
                farewell = self._dispatch(message, responders) or farewell
            return farewell or RendezvousError("closed", "the rendezvous closed the connection")
        except RemoteProtocolError as exc:
            return RendezvousError("protocol-error", f"rendezvous sent garbage: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return farewell or RendezvousError("closed", f"control connection lost: {exc}")

    async def _reconnect(self) -> None:
        """Register again, same name, same local port, with :func:`backoff` between tries."""
        for tries, delay in enumerate(backoff(), 1):
            await trio.sleep(delay)
            try:
                channel, registered, candidates, server = await self._registration.register()
            except (RendezvousError, OSError) as exc:
                log.info("reconnect %d to the rendezvous failed: %s", tries, exc)
                continue
            self._channel, self._idle_timeout = channel, registered.idle_timeout
            self.host_candidate, self.host_candidates = candidates[0], candidates
            self.rendezvous = server
            if registered.observed != self.observed:  # a relayed stream may move now
                self._observed_changed.set()
                self._observed_changed = trio.Event()
            self.observed = registered.observed
            self._closed = None
            self._registered.set()
            log.warning(
                "registered %r again after %d tries: server-reflexive %s",
                self.name,
                tries,
                self.observed,
            )
            return

    def _close_unaccepted(self) -> None:
        """Abort the punched streams nobody called :meth:`accept` for."""
        self._accepted_send.close()
        while True:
            try:
                outcome = self._accepted.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(outcome, PeerStream):
                reuse.abort(outcome.socket)

    def _reply(self, request_id: int, reply: _Reply) -> bool:
        """Hand ``reply`` to the ``connect`` waiting on ``request_id``; False if none takes it."""
        try:
            self._waiters[request_id].send_nowait(reply)
        except (KeyError, trio.WouldBlock, trio.BrokenResourceError):
            log.info("dropping a second or late reply to request %d: %r", request_id, reply)
            return False
        return True

    def _dispatch(self, message: object, responders: trio.Nursery) -> RendezvousError | None:
        """Act on one message; return the error the server said goodbye with, if it did."""
        if isinstance(message, Introduction):
            # Open the route now, in the reader, before any inbound Hello for this
            # attempt can be read; the race that consumes it closes it. The punch's
            # times count from now (its route and its task cost about 0.5 ms).
            arrived = trio.current_time()
            if message.request_id is None and message.upgrade is not None:
                log.info("%r asks to move a relayed stream to a direct path", message.peer_name)
                self._drop_upgrade_syns(message, True)
                self._router.open_route(message.attempt_id)
                self._introduced_at[message.attempt_id] = arrived
                responders.start_soon(self._respond_upgrade, message)
                return None
            if message.request_id is None:
                log.info(
                    "introduced to %r as responder; its candidates: %s; its NAT: %s",
                    message.peer_name,
                    _listed(message.candidates),
                    message.peer_nat or "not reported",
                )
                self._router.open_route(message.attempt_id)
                self._introduced_at[message.attempt_id] = arrived
                responders.start_soon(self._respond, message)
                return None
            if message.request_id in self._waiters:
                log.info(
                    "introduced to %r as initiator; its candidates: %s; its NAT: %s",
                    message.peer_name,
                    _listed(message.candidates),
                    message.peer_nat or "not reported",
                )
                if self._reply(message.request_id, message):
                    self._drop_upgrade_syns(message, True)
                    self._router.open_route(message.attempt_id)
                    self._introduced_at[message.attempt_id] = arrived
                return None
        if isinstance(message, Error) and message.request_id in self._waiters:
            self._reply(message.request_id, message)
        elif isinstance(message, Error):  # shutting-down, idle-timeout: it closes next
            log.warning("rendezvous error: %s: %s", message.code, message.text)
            return RendezvousError(message.code, message.text)
        else:
            log.info("ignoring a reply nobody waits for: %r", message)
        return None


async def _keep_alive(channel: ControlChannel, idle_timeout: float) -> None:
    """A Keepalive on ``channel`` every third of ``idle_timeout`` (the server's, from
    ``Registered``: every 15 s against the default 45 s), until it breaks."""
    while True:
        await trio.sleep(idle_timeout / KEEPALIVES_PER_IDLE_TIMEOUT)
        try:
            await channel.send(Keepalive())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # its reader sees the loss


def _listed(candidates: Iterable[object]) -> str:
    return ", ".join(str(c) for c in candidates) or "none"


@asynccontextmanager
async def open_host(
    name: str,
    *,
    rendezvous: _EndpointLike | Sequence[_EndpointLike],
    local: _EndpointLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pacing: float = DEFAULT_PACING,
    token: str | None = None,
    rendezvous_ssl_context: ssl.SSLContext | None = None,
    rendezvous_hostname: str | None = None,
    identity: Identity | None = None,
    encrypt: bool = True,
    family: socket.AddressFamily | None = None,
    stagger: float = DEFAULT_STAGGER,
    probe_port: int | None = None,
    relay: RelayMode | str = RelayMode.FALLBACK,
    relay_stagger: float = DEFAULT_RELAY_STAGGER,
) -> AsyncIterator[Host]:
    """Bind one port, register ``name`` at the rendezvous, and keep both open.

    Example::

        async with punch.open_host("alice", rendezvous="203.0.113.10:7000") as host:
            stream = await host.connect("bob")

    Args:
        name: our name, 1-64 characters of ``[A-Za-z0-9._-]``.
        rendezvous: the server's IP and TCP port (:class:`Endpoint`,
            ``(ip, port)`` or ``"ip:port"``/``"[ipv6]:port"``), or a sequence
            of them (one server reachable on IPv4 and on IPv6): the first we
            reach from a family we hold is registered with, in order. With
            endpoints of both families, a dual-stack host also registers its
            name over the other family, in the background (same key: the
            rendezvous learns a server-reflexive endpoint per family and
            offers both to peers, :attr:`Host.server_reflexive`); that second
            registration is best effort, kept alive and renewed like the first.
        local: the endpoint to bind, then in its family only; default
            dual-stack: ``0.0.0.0`` and ``::`` on one port number (the kernel
            picks it), a family that is unavailable left out with a log line.
        family: ``socket.AF_INET`` or ``socket.AF_INET6`` to hold a port in
            that family only (the CLI's ``-4``/``-6``); default both.
        stagger: seconds (0.01-2.0) IPv4 candidates wait while IPv6 ones are
            dialled (:class:`PunchOptions`); default 0.1.
        relay: ``"fallback"`` (default), ``"never"`` or ``"only"``
            (:class:`PunchOptions`): whether our punches, ours and our
            peers', may end on a stream through the rendezvous's relay.
        relay_stagger: seconds (0-60) the relay waits while the direct paths
            race, in our own connects (:class:`PunchOptions`); default 2.0.
        probe_port: the rendezvous's probe port (1-65535), where the host
            measures its NAT after registering (:attr:`Host.nat`); default the
            rendezvous's port + 1 (``punch-rendezvous``'s default); 0: do not.
        timeout: seconds (float, finite, > 0) one punch, and one rendezvous
            exchange, may take.
        pacing: seconds (float, finite, >= 0.05) between connect attempts to
            one candidate. Both are checked here, once, into
            :class:`PunchOptions` (:attr:`Host.options`).
        token: the rendezvous's access token, if it requires one
            (``punch-rendezvous --token-file``).
        rendezvous_ssl_context: speak TLS to the rendezvous with this client
            context (e.g. ``ssl.create_default_context(cafile=...)``); the
            introductions carry the punch secrets (RFC 8445 §19.2).
        rendezvous_hostname: the name its certificate must show (default the
            rendezvous IP).
        identity: our :class:`~punch.Identity`; its key is registered with
            ``name`` (signed over the server's challenge) and proven to peers in
            TLS. Default: a new one for this host (peers then cannot pin us).
        encrypt: TLS 1.3 on every punched stream (default True); see
            :class:`PunchOptions`.

    Yields:
        the registered :class:`Host`. It listens on its port only while a
        punch is under way, so that between punches ``SO_REUSEPORT`` never
        spreads another same-user process's connections to it. Leaving the
        block closes the control connection and any listener; streams already
        returned stay open. When the rendezvous goes away (it restarts, the
        path breaks), the host registers again under the same name from the
        same port, waiting :func:`backoff` between tries (0.5 s doubling to
        30 s, jittered), for as long as the block lasts; ``accept`` keeps
        waiting meanwhile, and ``connect`` fails at once with ``closed``
        (unless the other family's registration still holds: it asks there).

    Raises:
        TypeError, ValueError: a bad argument (``timeout=True``, ``pacing=0.01``,
            no rendezvous of a family we may use...), before any socket is opened.
        ReuseUnavailable: the OS cannot share one port (see :func:`reuse_available`).
        OSError: ``local`` cannot be bound, or no family can be.
        NameTaken: (a :class:`RendezvousError`, ``name-taken``) ``name`` is
            bound to another key: held by a connected peer, or, on a server
            with ``--persist-names``, registered with another key before.
        RendezvousError: ``unreachable`` (TLS failures included),
            ``unauthorized``, ``server-full``, ``rate-limited``,
            ``bad-candidate``, ``timeout``, ``closed`` or ``protocol-error``
            while registering.
    """
    check_name(name)
    options = PunchOptions(
        timeout=timeout,
        pacing=pacing,
        encrypt=encrypt,
        stagger=stagger,
        relay=relay,
        relay_stagger=relay_stagger,
    )
    if probe_port is not None and (
        not isinstance(probe_port, int)
        or isinstance(probe_port, bool)
        or not 0 <= probe_port < 65536
    ):
        raise ValueError(f"probe_port must be 0-65535, not {probe_port!r}")
    if identity is None:
        identity = Identity.generate()
    elif not isinstance(identity, Identity):
        raise TypeError(f"identity must be a punch.Identity, not {identity!r}")
    timeout = options.timeout
    servers = _servers(rendezvous)
    wanted = _wanted_locals(servers, local, family)
    if not reuse.reuse_available():
        raise ReuseUnavailable("this OS cannot share one TCP port (SO_REUSEADDR + SO_REUSEPORT)")
    # Listen once to pick (port 0) and prove a port we can listen on; the control
    # connection then holds it, and the router listens again only during punches.
    probes = _listen_on_one_port(wanted)
    try:
        bound = tuple(Endpoint.from_sockaddr(p.socket.getsockname()) for p in probes)
        registration = _Registration(
            name,
            identity,
            bound,
            servers,
            timeout,
            token,
            rendezvous_ssl_context,
            rendezvous_hostname,
        )
        channel, registered, candidates, server = await registration.register()
    finally:
        for probe in probes:
            probe.socket.close()
    host: Host | None = None
    try:
        log.info(
            "registered %r on %s: host candidates %s, server-reflexive %s",
            name,
            ", ".join(map(str, bound)),
            _listed(candidates),
            registered.observed,
        )
        try:
            async with trio.open_nursery() as nursery:
                router = InboundRouter(bound)
                host = Host(
                    name,
                    identity,
                    bound[0],
                    candidates[0],
                    registered.observed,
                    options,
                    bound,
                    candidates,
                    server,
                    channel,
                    router,
                    registration,
                    registered.idle_timeout,
                )
                host._nursery = nursery
                await nursery.start(router.serve)
                nursery.start_soon(host._run_registrations, registration.legs(server))
                if options.encrypt:
                    nursery.start_soon(_prepare_tls, identity)
                nursery.start_soon(host._report_nat, probe_port)
                try:
                    yield host
                finally:
                    nursery.cancel_scope.cancel()
                    host._close_unaccepted()
        except BaseExceptionGroup as group:
            # The background tasks never raise, so a lone exception is the
            # caller's own (RendezvousError, PunchFailed...): give it back as is.
            if len(group.exceptions) != 1:
                raise
            error = group.exceptions[0]
            error.__suppress_context__ = True  # keeps its own __cause__
            raise error from error.__cause__
    finally:
        reuse.abort((host._channel if host is not None else channel).socket)


async def _prepare_tls(identity: Identity) -> None:
    """Build the identity's TLS contexts in a worker thread, off every punch's path
    (:meth:`Identity.prepare_tls`); a failure is left for the punch that needs one
    to report, typed, from ``_secure.encrypt``."""
    try:
        await trio.to_thread.run_sync(identity.prepare_tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        log.debug("could not prepare TLS contexts: %s", exc)


def _servers(rendezvous: _EndpointLike | Sequence[_EndpointLike]) -> tuple[Endpoint, ...]:
    """The rendezvous endpoints, in order; one alone or a sequence of them."""
    if isinstance(rendezvous, Endpoint | str):
        return (as_endpoint(rendezvous, "rendezvous"),)
    if isinstance(rendezvous, tuple) and len(rendezvous) == 2 and isinstance(rendezvous[1], int):
        return (as_endpoint((rendezvous[0], rendezvous[1]), "rendezvous"),)
    if not isinstance(rendezvous, Sequence) or not rendezvous:
        raise TypeError(f"rendezvous must be an endpoint or a sequence of them, not {rendezvous!r}")
    return tuple(as_endpoint(r, "rendezvous") for r in rendezvous)  # type: ignore[arg-type]


def _wanted_locals(
    servers: tuple[Endpoint, ...], local: _EndpointLike | None, family: socket.AddressFamily | None
) -> tuple[Endpoint, ...]:
    """What to bind: ``local`` alone, or the unspecified address of each family
    (the first server's first), port 0; only ``family`` when given."""
    if family not in (None, socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be socket.AF_INET or socket.AF_INET6, not {family!r}")
    if local is not None:
        wanted: tuple[Endpoint, ...] = (as_endpoint(local, "local"),)
        if family is not None and wanted[0].family != family:
            raise ValueError(f"local {wanted[0]} is not of family {family.name}")
    else:
        families = dict.fromkeys([servers[0].family, socket.AF_INET, socket.AF_INET6])
        unspecified = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
        wanted = tuple(Endpoint(unspecified[f], 0) for f in families if family in (None, f))
    held = {e.family for e in wanted}
    if not any(s.family in held for s in servers):
        families_text = " or ".join(f.name for f in held)
        raise ValueError(f"no rendezvous endpoint is {families_text}: {_listed(servers)}")
    return wanted


def _listen_on_one_port(wanted: tuple[Endpoint, ...]) -> list[trio.SocketListener]:
    """A listener on each of ``wanted`` (one per family), all on one port number.

    The first is bound as given (port 0: the kernel picks); the others on its
    port. A family this machine lacks (``EAFNOSUPPORT``, ``EADDRNOTAVAIL``)
    is left out with a log line; a port the other family has taken is given
    up for a new one, :data:`SAME_PORT_TRIES` times.

    Raises:
        OSError: the first cannot be bound, or no port was free in both families.
    """
    first, *others = wanted
    for _ in range(SAME_PORT_TRIES):
        listeners = [reuse.open_listener(first)]
        port = Endpoint.from_sockaddr(listeners[0].socket.getsockname()).port
        try:
            for other in others:
                try:
                    listeners.append(reuse.open_listener(Endpoint(other.ip, port)))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and first.port == 0:
                        raise
                    log.warning(
                        "%s unavailable (%s): holding %s only", other, exc, first.family.name
                    )
        except OSError:
            for listener in listeners:
                listener.socket.close()
            continue
        return listeners
    raise OSError(errno.EADDRINUSE, f"no port free in both families after {SAME_PORT_TRIES} tries")


def signed_register(
    identity: Identity,
    challenge: Challenge,
    name: str,
    candidates: tuple[Endpoint, ...] = (),
    token: str | None = None,
) -> Register:
    """The Register that answers ``challenge``: ``name`` and our certificate, signed by our key."""
    signature = identity.sign(registration_transcript(challenge.nonce, name))
    return Register(name, identity.certificate, signature, candidates, token)


async def _register(
    channel: ControlChannel, registration: _Registration, candidates: tuple[Endpoint, ...]
) -> Registered:
    """Send a Keepalive at once, wait for the server's Challenge, send our signed
    Register, return its answer.

    Raises:
        NameTaken: the name is bound to another key.
        RendezvousError: any other refusal, a timeout, garbage or a lost connection.
    """
    try:
        with trio.fail_after(registration.timeout):
            await channel.send(Keepalive())  # data at once: see punch._protocol, "Order"
            challenge = await channel.receive()
            if isinstance(challenge, Challenge):
                register = signed_register(
                    registration.identity,
                    challenge,
                    registration.name,
                    candidates,
                    registration.token,
                )
                await channel.send(register)
                reply = await channel.receive()
            else:
                reply = challenge
    except trio.TooSlowError:
        raise RendezvousError(
            "timeout", f"no registration within {registration.timeout:g} s"
        ) from None
    except RemoteProtocolError as exc:
        raise RendezvousError("protocol-error", f"rendezvous sent garbage: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise RendezvousError("closed", f"control connection lost: {exc}") from exc
    if isinstance(reply, Error):
        error = NameTaken if reply.code == "name-taken" else RendezvousError
        raise error(reply.code, reply.text)
    if not isinstance(reply, Registered):
        raise RendezvousError("closed", "the rendezvous closed the connection while registering")
    return reply


async def connect(
    peer: str,
    *,
    rendezvous: Endpoint | tuple[str, int] | str,
    name: str,
    timeout: float = DEFAULT_TIMEOUT,
    local: Endpoint | tuple[str, int] | str | None = None,
    identity: Identity | None = None,
    peer_id: str | None = None,
    encrypt: bool = True,
    relay: RelayMode | str = RelayMode.FALLBACK,
) -> PeerStream:
    """Register as ``name``, punch a direct TCP connection to ``peer``, and return it
    (or, where none comes, a relayed one: ``relay``).

    A one-shot :func:`open_host` + :meth:`Host.connect`: the host's listener
    and registration are closed before this returns; the stream stays open.

    Args:
        peer: the other peer's registered name.
        rendezvous: the server, as :func:`open_host` takes it.
        name: our name (1-64 of ``[A-Za-z0-9._-]``), held while connecting.
        timeout: seconds (> 0; default 10.0) for the introduction and the punch.
        local: the endpoint to bind, as :func:`open_host` takes it.
        identity: our :class:`~punch.Identity` (default: a new one).
        peer_id: the peer ID ``peer`` must prove, as :meth:`Host.connect`.
        encrypt: TLS 1.3 on the stream (default True).
        relay: ``"fallback"`` (default), ``"never"`` or ``"only"``, as
            :meth:`Host.connect` (:class:`RelayMode`).

    Returns:
        the authenticated :class:`PeerStream`; we are its initiator.

    Raises:
        Everything :func:`open_host` and :meth:`Host.connect` raise.
    """
    stream = None
    try:
        async with open_host(
            name,
            rendezvous=rendezvous,
            local=local,
            timeout=timeout,
            identity=identity,
            encrypt=encrypt,
        ) as host:
            stream = await host.connect(peer, peer_id=peer_id, relay=relay)
    except BaseException:
        if stream is not None:  # cancelled while the host closed: the stream is nobody's
            reuse.abort(stream.socket)
        raise
    return stream
