"""The rendezvous server: a registry of peers and the introductions between them.

It faces the internet, so every resource a stranger can make it hold is
bounded (:class:`ServerLimits`), and every refusal is an ``Error`` frame with
a typed code, sent before that one connection is closed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from . import reuse
from ._cluster import Cluster, ClusterUnavailable, NameHeld, RemotePeer
from ._control import ControlChannel
from ._endpoint import Candidate, Endpoint, Role, as_endpoint
from ._errors import LocalProtocolError, PeerVerificationError, RemoteProtocolError
from ._identity import certificate_key, check_peer_id, peer_id, verify_signature
from ._nat import NatFacts
from ._parking import Parking
from ._protocol import (
    ATTEMPT_ID_BYTES,
    CHALLENGE_BYTES,
    DEFAULT_IDLE_TIMEOUT,
    MAX_ERROR_TEXT,
    MAX_FRAME,
    MIN_FRAME,
    SECRET_BYTES,
    Challenge,
    ConnectRequest,
    Error,
    Introduction,
    Keepalive,
    Message,
    Probed,
    Reach,
    Reached,
    Register,
    Registered,
    RelayGrant,
    RendezvousConnection,
    Report,
    Side,
    check_idle_timeout,
    check_name,
    introduction_candidates,
    registration_transcript,
)
from ._relay import Refused, Relay

log = logging.getLogger("punch.server")

REGISTRATION_TIMEOUT = 10.0
"""Seconds a new control connection has to complete its Register (TLS included)."""
SERVER_BACKLOG = 65535
"""listen(2) backlog of every server listener; the kernel caps it at
``net.core.somaxconn`` (4096 by default since Linux 5.4), as for trio's own
``open_tcp_listeners``. Peers reconnect in storms (after a restart, thousands
within a second); a backlog of 128 overflowed there, and each SYN it dropped
cost its peer a retransmission a second later (``ListenOverflows``)."""
SEND_TIMEOUT = 5.0
"""Seconds a frame may take to leave; a peer that does not read is dropped."""
REFUSAL_TIMEOUT = 1.0
"""Seconds a refusal's ``Error`` frame gets before the connection is closed anyway."""
_DRAIN_LIMIT = 65536
"""Bytes a refused connection may still send us before it is reset."""
SHUTDOWN_GRACE = 2.0
"""Seconds, on shutdown, to tell every registered peer ``shutting-down``."""
REACH_TIMEOUT = 2.0
"""Seconds a probe port's dial (:class:`~punch._protocol.Reach`) may take: one SYN
retransmission (at 1 s, :func:`punch.reuse.cap_retransmission_timeout`) fits, so
one lost SYN is not taken for a filtering NAT."""
MAX_REACHES = 16
"""Probe-port dials under way at once, server-wide; beyond, a Reach gets ``busy``."""

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[_Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be finite and > 0, not {value!r}")


@attrs.frozen
class ServerLimits:
    """Every bound of one rendezvous server; each is a ``punch-rendezvous`` flag.

    Args:
        max_frame: largest frame accepted, bytes (1024..4096; libp2p DCUtR's 4 KiB).
        registration_timeout: seconds from accept to a completed Register.
        idle_timeout: seconds (3..86400) a registered peer may stay silent
            before it is dropped; default 45 (RFC 7675's 30 s consent expiry,
            plus room for one lost keepalive). ``Registered`` tells each client,
            which sends a Keepalive every third of it.
        max_connections_per_ip: concurrent control connections from one source
            (go-libp2p's default is 8 per IPv4 /32; an IPv6 source is its /64,
            :func:`source_key`).
        exempt: source networks free of both per-IP limits: loopback, plus
            the operator's allow-list (a carrier NAT's public address, say).
        max_peers: registered peers at once, over all sources.
        registrations_per_minute: Registers from one source (:func:`source_key`) in any 60 s
            (refused ones count, so a token cannot be guessed fast).
        introductions_per_minute: ConnectRequests one peer may make in any 60 s.
        token: if set, a Register must carry it (compared in constant time).
    """

    max_frame: int = attrs.field(default=MAX_FRAME)
    registration_timeout: float = attrs.field(default=REGISTRATION_TIMEOUT, validator=_positive)
    idle_timeout: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT, validator=check_idle_timeout)
    max_connections_per_ip: int = attrs.field(default=8, validator=_positive)
    exempt: tuple[_Network, ...] = LOOPBACK
    max_peers: int = attrs.field(default=100_000, validator=_positive)
    registrations_per_minute: int = attrs.field(default=60, validator=_positive)
    introductions_per_minute: int = attrs.field(default=60, validator=_positive)
    token: str | None = attrs.field(default=None, repr=lambda t: "<token>" if t else "None")

    @max_frame.validator
    def _check_frame(self, _: object, value: int) -> None:
        if not MIN_FRAME <= value <= MAX_FRAME:
            raise ValueError(f"max_frame must be {MIN_FRAME}..{MAX_FRAME} bytes, not {value!r}")

    def is_exempt(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Is this source free of the per-IP limits?"""
        return any(ip in net for net in self.exempt if net.version == ip.version)


IPV6_SOURCE_PREFIX = 64
"""The per-source limits count an IPv6 source by its /64: one subscriber's
prefix (RFC 6177 assigns a /48 to /56 per site; a /64 is one LAN's, whose
hosts pick their own addresses, RFC 4862), as go-libp2p's resource manager does."""


def source_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What the per-source limits count a connection under: ``"192.0.2.7"`` or ``"2001:db8::/64"``.

    An IPv4 address is its own key; an IPv6 address is keyed by its /64
    (:data:`IPV6_SOURCE_PREFIX`), so a host cannot walk around the limits by
    picking new addresses in its own prefix. An IPv4-mapped IPv6 address (a
    dual-stack listener's view of an IPv4 peer, RFC 4291 §2.5.5.2) is keyed by
    its IPv4 address, never by ``::ffff:0:0/64``, which would lump every IPv4
    source together.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


@attrs.define
class RateLimit:
    """At most ``per_minute`` events per key in any 60 s window (a sliding log).

    Memory: at most ``per_minute`` timestamps per key; keys idle for 60 s are
    swept once a minute, so a flood of distinct keys is forgotten.
    """

    per_minute: int
    _events: dict[Hashable, collections.deque[float]] = attrs.field(factory=dict, init=False)
    _swept: float = attrs.field(default=-math.inf, init=False)

    def allow(self, key: Hashable, now: float) -> bool:
        """Record an event for ``key`` at ``now`` (seconds) if it is within the limit."""
        if now - self._swept >= 60.0:
            self._events = {k: q for k, q in self._events.items() if now - q[-1] < 60.0}
            self._swept = now
        events = self._events.setdefault(key, collections.deque())
        while events and now - events[0] >= 60.0:
            events.popleft()
        if len(events) >= self.per_minute:
            return False
        events.append(now)
        return True


def candidate_problem(endpoint: Endpoint, allow_loopback: bool) -> str | None:
    """Why a claimed host candidate is refused, or ``None`` if it is acceptable.

    Refused, for IPv4, IPv6 and IPv4-mapped IPv6 alike: the unspecified
    address, multicast, the limited broadcast address, port 0, and loopback
    unless ``allow_loopback`` (a peer on the server's own machine). A server
    that relayed such addresses would turn peers into reflectors aimed at
    themselves or their neighbours (coturn CVE-2020-26262).
    """
    ip = endpoint.address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if endpoint.port == 0:
        return "port 0"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if ip.is_loopback and not allow_loopback:
        return "a loopback address"
    return None


_Refused = Refused
"""Close this connection after telling the peer ``error`` (the relay raises it too)."""


@attrs.define(eq=False)
class _Peer:
    name: str
    observed: Endpoint
    host_candidates: tuple[Endpoint, ...]
    channel: ControlChannel
    certificate: bytes
    peer_id: str
    legs: list[_Peer] = attrs.field(factory=list)
    """Registrations of this name and key over another address family (a dual-stack
    host registers once per family): their endpoints are this peer's too."""
    nat: NatFacts | None = None
    """What it reported of its NAT (a ``Report`` on this registration)."""
    cluster_field: str | None = None
    """Its field in the cluster's registry (:class:`punch.Cluster`), once claimed."""

    @property
    def nat_facts(self) -> NatFacts | None:
        """The first report among its registrations (the IPv4 one has the NAT)."""
        return next((p.nat for p in (self, *self.legs) if p.nat is not None), None)

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Server-reflexive ones first (ours, then each leg's), then host candidates;
        duplicates dropped, at most ``MAX_CANDIDATES + 1`` (what an Introduction holds)."""
        everyone = (self, *self.legs)
        hosts = [e for p in everyone for e in p.host_candidates]
        return introduction_candidates([p.observed for p in everyone], hosts)

    @property
    def families(self) -> set[socket.AddressFamily]:
        return {p.observed.family for p in (self, *self.legs)}


PROTOCOL_WARNINGS_PER_MINUTE = 5
"""WARNING lines per source (:func:`source_key`) a minute for malformed connections."""


@attrs.define
class WarningThrottle:
    """The first few WARNING lines per source a minute, then one summary with counts.

    A flood of garbage connections becomes at most
    :data:`PROTOCOL_WARNINGS_PER_MINUTE` lines per source a minute, plus one
    line a minute (written with the next warning due after it) that counts
    what was left out and names the source that sent the most.
    """

    per_minute: int = PROTOCOL_WARNINGS_PER_MINUTE
    _limit: RateLimit = attrs.field(init=False)
    _suppressed: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _since: float = attrs.field(default=-math.inf, init=False)

    def __attrs_post_init__(self) -> None:
        self._limit = RateLimit(self.per_minute)

    def warn(self, source: str, now: float, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING unless ``source`` has had its share."""
        if self._suppressed and now - self._since >= 60.0:
            (top, count), *_ = self._suppressed.most_common(1)
            log.warning(
                "%d more malformed connections from %d source(s) not logged in %.0f s "
                "(the most from %s: %d)",
                self._suppressed.total(),
                len(self._suppressed),
                now - self._since,
                top,
                count,
            )
            self._suppressed.clear()
        if not self._suppressed:
            self._since = now
        if self._limit.allow(source, now):
            log.warning(message, *args)
        else:
            self._suppressed[source] += 1


@attrs.define(eq=False)
class NameBindings:
    """Which key each name was first registered with (trust on first use), on disk.

    An append-only file of JSON lines, ``{"name": ..., "peer_id": ...}``, one
    per name's first registration; loading keeps the first line per name and
    cuts off a torn last line (a crash mid-write), so the next line appends
    cleanly. Appending costs one short write, whatever the number of names.

    Args:
        path: the file; created on the first binding.

    Raises (on construction):
        OSError: the file exists and cannot be read.
        ValueError: a line other than the last is not a binding.
    """

    path: Path
    bound: dict[str, str] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                name, key = check_name(entry["name"]), check_peer_id(entry["peer_id"])
            except (ValueError, TypeError, KeyError) as exc:
                if number == len(lines):  # cut it off, or the next append would extend it
                    log.warning("%s: dropping a torn last line: %s", self.path, exc)
                    with self.path.open("r+") as file:
                        file.truncate(sum(len(kept) + 1 for kept in lines[:-1]))
                    break
                raise ValueError(f"{self.path}:{number}: not a name binding: {exc}") from exc
            self.bound.setdefault(name, key)
        log.info("%s: %d name(s) bound to keys", self.path, len(self.bound))

    def bind(self, name: str, key: str) -> None:
        """Record ``name``'s key if it has none yet (one appended line, flushed to disk).

        A write that fails is logged at ERROR; the binding then holds until restart.
        """
        if name in self.bound:
            return
        self.bound[name] = key
        line = json.dumps({"name": name, "peer_id": key}) + "\n"
        try:
            with self.path.open("a") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:  # the registration stands; the binding lives until restart
            log.error("%s: cannot record %r's key: %s", self.path, name, exc)


@attrs.define(eq=False)
class RendezvousServer:
    """The registry behind :func:`serve_rendezvous`; one instance per listening server.

    Args:
        limits: :class:`ServerLimits`.
        ssl_context: wrap every control connection in TLS with this context.
        on_loopback: the server listens on a loopback address (then loopback
            host candidates are fine from anyone).
        bindings: keep each name bound to its first key for good
            (:class:`NameBindings`); without, a name is bound only while its
            holder is connected.
        relay: the relay on our relay port (:class:`punch._relay.Relay`), whose
            grants go into introductions that ask for one; None: no relay.
        relay_port: that port (grants name it at the address each peer reached).
        relay_at: a relay elsewhere (:func:`serve_relay`, sharing ``relay``'s
            secret) that grants name instead.
        cluster: the registry shared with other processes in Redis
            (:class:`punch.Cluster`); None: this process alone.
    """

    limits: ServerLimits = attrs.field(factory=ServerLimits)
    ssl_context: ssl.SSLContext | None = None
    on_loopback: bool = False
    bindings: NameBindings | None = None
    relay: Relay | None = None
    relay_port: int = 0
    relay_at: Endpoint | None = None
    cluster: Cluster | None = None
    peers: dict[str, _Peer] = attrs.field(factory=dict, init=False)
    connections: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _registrations: RateLimit = attrs.field(init=False)
    _introductions: RateLimit = attrs.field(init=False)
    _protocol_warnings: WarningThrottle = attrs.field(factory=WarningThrottle, init=False)
    _reaches: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(MAX_REACHES), init=False)
    _parking: Parking[_Peer] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._registrations = RateLimit(self.limits.registrations_per_minute)
        self._introductions = RateLimit(self.limits.introductions_per_minute)
        self._parking = Parking(
            self._resume, partial(self._resume, idle=True), self.limits.idle_timeout, self._drop
        )

    async def park_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold registered peers that wait (plain TCP) without a task each, until
        cancelled (:mod:`punch._parking`: about 5 KiB less memory per idle peer);
        then close every connection still parked. Without it, each registered
        peer keeps its own task. Follows trio's ``nursery.start`` protocol.

        Raises:
            RuntimeError: it is already running.
        """
        await self._parking.run(task_status=task_status)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one control connection until it closes; never raises but Cancelled."""
        await self._guarded(stream, self._handle)

    async def handle_probe(self, stream: trio.SocketStream) -> None:
        """Serve one probe-port connection (:func:`punch.natcheck`); never raises but Cancelled."""
        await self._guarded(stream, self._probe)

    async def handle_relay(self, stream: trio.SocketStream) -> None:
        """Serve one relay-port connection (:mod:`punch._relay`); never raises but Cancelled."""
        await self._guarded(stream, self._relayed)

    async def _relayed(self, stream: trio.SocketStream, observed: Endpoint) -> None:
        assert self.relay is not None
        async with self._session(stream, observed, relay=True) as session:
            await self.relay.serve(session.channel, stream, observed)

    async def _guarded(
        self,
        stream: trio.SocketStream,
        serve: Callable[[trio.SocketStream, Endpoint], Awaitable[bool | None]],
    ) -> None:
        """Run ``serve(stream, observed)`` so that nothing escapes but Cancelled.

        Everything, from the first line, runs under one guard: a peer can
        reset its connection before we ask for its address (``ENOTCONN`` from
        ``getpeername``), and ``trio.serve_listeners`` would let any exception
        that escapes a handler end the whole server.
        """
        try:
            observed = Endpoint.from_sockaddr(stream.socket.getpeername())
        except OSError as exc:  # reset before we looked: nothing to serve
            log.debug("a connection was gone before it was served: %s", exc)
            reuse.abort(stream.socket)
            return
        # an Introduction lost on the way is part of the punch's cost: resent each second
        reuse.cap_retransmission_timeout(stream.socket)
        await self._contained(serve(stream, observed), observed, stream.socket)

    @staticmethod
    async def _contained(
        serving: Awaitable[bool | None], observed: Endpoint, sock: trio.socket.SocketType
    ) -> None:
        """Await ``serving``, then close ``sock`` (an RST) unless ``serving`` kept its
        connection open (returned True: parked). Nothing escapes but Cancelled: any
        other exception is logged, since one connection's bug must never take the
        server down."""
        kept = False
        try:
            kept = bool(await serving)
        except Exception:
            log.exception("%s: unexpected error, closing this connection", observed)
        finally:
            if not kept:
                reuse.abort(sock)

    async def _resume(self, peer: _Peer, *, idle: bool = False) -> None:
        """A parked peer's connection is readable (or closed): answer it, then park it
        again or end it (``on_readable`` of :attr:`_parking`); with ``idle``, it sent
        nothing for ``idle_timeout`` s: refuse it (``idle-timeout``) and end it
        (``on_idle``). Never raises but Cancelled."""
        stream = peer.channel.stream
        assert isinstance(stream, trio.SocketStream)  # only plain TCP is parked
        await self._contained(self._continue(peer, stream, idle), peer.observed, stream.socket)

    async def _continue(self, peer: _Peer, stream: trio.SocketStream, idle: bool) -> bool:
        """A parked peer's session, picked up where :meth:`_handle` left it."""
        async with self._session(stream, peer.observed, channel=peer.channel) as session:
            try:
                if idle:
                    raise self._idle_timeout()
                session.kept = await self._serve(peer)
            finally:
                if not session.kept:
                    self._remove(peer)
                    await self._release(peer)
        return session.kept

    @contextlib.asynccontextmanager
    async def _session(
        self,
        stream: trio.SocketStream,
        observed: Endpoint,
        *,
        probe: bool = False,
        relay: bool = False,
        channel: ControlChannel | None = None,
    ) -> AsyncIterator[_Session]:
        """One connection's session, counted against its source's limit; a refusal,
        a protocol error or a lost connection inside ends it (told, then closed),
        and so does the end of the block, unless the block set ``kept`` (parked: a
        later session with that ``channel`` goes on from there, not counted again)."""
        source = source_key(observed.address)
        counted = not self.limits.is_exempt(observed.address)
        clustered = counted and self.cluster is not None
        resumed = channel is not None
        if channel is None:
            if counted:
                self.connections[source] += 1
            channel = ControlChannel(
                stream,
                stream.socket,
                RendezvousConnection(Side.SERVER, self.limits.max_frame, probe=probe, relay=relay),
            )
        session = _Session(channel)
        try:
            if not resumed:
                await self._admit_connection(source, observed, counted, clustered)
            yield session
        except _Refused as refusal:
            log.info("%s: refused: %s: %s", observed, refusal.error.code, refusal.error.text)
            await self._refuse(channel, refusal.error)
        except RemoteProtocolError as exc:
            self._protocol_warnings.warn(
                source, trio.current_time(), "%s: protocol error, closing: %s", observed, exc
            )
            await self._refuse(channel, Error(exc.code, str(exc)[:MAX_ERROR_TEXT]))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", observed, exc.__cause__ or exc)
        finally:
            if not session.kept:
                if counted:
                    self.connections[source] -= 1
                    if not self.connections[source]:
                        del self.connections[source]
                if clustered:
                    await self._cluster_disconnected(source)

    async def _admit_connection(
        self, source: str, observed: Endpoint, counted: bool, clustered: bool
    ) -> None:
        """Raise :class:`_Refused` (``too-many-connections``) if this new connection,
        counted, puts its source over the limit, here or across the cluster."""
        most = self.limits.max_connections_per_ip
        if counted and self.connections[source] > most:
            raise _Refused(
                Error("too-many-connections", f"more than {most} connections from {source}")
            )
        if clustered and not await self._cluster_connections(source, observed):
            raise _Refused(
                Error(
                    "too-many-connections",
                    f"more than {most} connections from {source} across the cluster",
                )
            )

    async def _handle(self, stream: trio.SocketStream, observed: Endpoint) -> bool:
        """A control connection: the registration, then the peer's requests; True
        when it was parked (:attr:`_parking`: the session goes on in :meth:`_resume`)."""
        peer: _Peer | None = None
        async with self._session(stream, observed) as session:
            channel = session.channel
            try:
                with trio.move_on_after(self.limits.registration_timeout) as registering:
                    if self.ssl_context is not None:
                        channel.stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
                        await channel.stream.do_handshake()
                    nonce = secrets.token_bytes(CHALLENGE_BYTES)
                    await channel.send(Challenge(nonce, observed))
                    # In the registry from here: the finally below removes it, however
                    # the reply fails (a reset, the registration timeout).
                    peer = await self._register(channel, observed)
                    if peer is not None:
                        await channel.send(Registered(observed, self.limits.idle_timeout))
                if registering.cancelled_caught:
                    log.info(
                        "%s: no registration within %g s",
                        observed,
                        self.limits.registration_timeout,
                    )
                    raise _Refused(Error("registration-timeout", "no Register in time"))
                if peer is not None:
                    session.kept = await self._serve(peer)
                    if session.kept:
                        _adopt(channel)
            finally:
                if peer is not None and not session.kept:
                    self._remove(peer)
                    await self._release(peer)
        return session.kept

    async def _probe(self, stream: trio.SocketStream, observed: Endpoint) -> None:
        """The probe port: tell the observed endpoint; dial back once if asked."""
        async with self._session(stream, observed, probe=True) as session:
            channel = session.channel
            with trio.move_on_after(self.limits.registration_timeout):
                await channel.send(Probed(observed))
                request = await channel.receive()
                if request is None:
                    return
                assert isinstance(request, Reach)  # the protocol state machine ensures it
                here = Endpoint.from_sockaddr(stream.socket.getsockname())
                await channel.send(await self._reach(here, observed, request.endpoint))
                await stream.send_eof()
                await channel.receive()  # its FIN: closing first would answer with an RST

    async def _reach(self, here: Endpoint, observed: Endpoint, target: Endpoint) -> Message:
        """Dial ``target`` from ``here`` (the probe port), at most :data:`REACH_TIMEOUT` s.

        Only the address the probe came from may be dialled, and at most
        :data:`MAX_REACHES` dials run at once: the probe port is no way to
        aim SYNs at anyone else. The connection, if made, is reset at once.
        """
        if target.address != observed.address:
            raise _Refused(Error("reach-elsewhere", f"only {observed.ip} may be reached"))
        try:
            self._reaches.acquire_nowait()
        except trio.WouldBlock:
            raise _Refused(Error("busy", f"{MAX_REACHES} dials under way")) from None
        try:
            with trio.move_on_after(REACH_TIMEOUT):
                try:
                    reached = await reuse.dial(here, target)
                except OSError as exc:
                    log.info("%s: reach from %s: %s", target, here, exc)
                    name = errno.errorcode.get(exc.errno or 0, "error")
                    return Reached(False, "refused" if exc.errno == errno.ECONNREFUSED else name)
                reuse.abort(reached.socket)
                log.info("%s: reached from %s", target, here)
                return Reached(True, "connected")
            log.info("%s: reach from %s timed out after %g s", target, here, REACH_TIMEOUT)
            return Reached(False, "timed out")
        finally:
            self._reaches.release()

    def _remove(self, peer: _Peer) -> None:
        """Take ``peer`` out of the registry; a leg of its name takes its place."""
        held = self.peers.get(peer.name)
        if held is peer:
            if peer.legs:
                successor, *others = peer.legs
                successor.legs = others
                self.peers[peer.name] = successor
                log.info(
                    "%s: %r left; still registered from %s",
                    peer.observed,
                    peer.name,
                    successor.observed,
                )
            else:
                del self.peers[peer.name]
                log.info("%s: %r left", peer.observed, peer.name)
        elif held is not None and peer in held.legs:
            held.legs.remove(peer)
            log.info(
                "%s: %r's %s registration left", peer.observed, peer.name, peer.observed.family_name
            )

    async def _register(self, channel: ControlChannel, observed: Endpoint) -> _Peer | None:
        """Read the Register, admit it, and enter the peer in the registry.

        No await comes after the insertion, so the caller always learns the
        peer it must remove (issue 13: a failed reply left the name held).
        """
        message = await channel.receive()
        if isinstance(message, Keepalive):  # a client's first frame, to carry its ACK
            message = await channel.receive()
        if message is None:
            return None
        assert isinstance(message, Register)  # the protocol state machine ensures it
        assert channel.connection.challenge is not None  # sent before any Register is read
        await self._limit_registrations(observed)
        key = self._admit(message, observed, channel.connection.challenge)
        peer = _Peer(message.name, observed, message.candidates, channel, message.certificate, key)
        if self.cluster is not None:
            await self._claim(peer)
        held = self.peers.get(peer.name)
        if held is not None:  # admitted: the same key, over another family
            held.legs.append(peer)
            log.info(
                "%s: registered %r over %s too, host candidates %s",
                observed,
                peer.name,
                observed.family_name,
                ", ".join(map(str, peer.host_candidates)) or "none",
            )
            return peer
        if self.bindings is not None:
            self.bindings.bind(peer.name, peer.peer_id)
        self.peers[peer.name] = peer
        log.info(
            "%s: registered %r (peer ID %s), host candidates %s",
            observed,
            peer.name,
            peer.peer_id,
            ", ".join(map(str, peer.host_candidates)) or "none",
        )
        return peer

    def _admit(self, message: Register, observed: Endpoint, challenge: bytes) -> str:
        """The peer ID of the Register's key; raise :class:`_Refused` unless it may take its name.

        The certificate must be a self-signed Ed25519 one, and the signature
        must sign this connection's challenge and the name with its key
        (``bad-signature``); the name must be free (``name-taken``): not held
        by a connected peer, and, with :attr:`bindings`, never bound to another key.
        """
        limits = self.limits
        expected = limits.token
        if expected is not None and not (
            message.token is not None
            and hmac.compare_digest(message.token.encode(), expected.encode())
        ):
            raise _Refused(Error("unauthorized", "this server needs its access token"))
        try:
            key = certificate_key(message.certificate)
        except PeerVerificationError as exc:
            raise _Refused(Error("bad-signature", str(exc)[:MAX_ERROR_TEXT])) from exc
        transcript = registration_transcript(challenge, message.name)
        if not verify_signature(key, message.signature, transcript):
            raise _Refused(Error("bad-signature", "the Register is not signed by its key"))
        presented = peer_id(key)
        self._check_free(message.name, presented, observed)
        held = self.peers.get(message.name)
        bound = self.bindings.bound.get(message.name) if self.bindings is not None else None
        if bound is not None and bound != presented:
            raise _Refused(
                Error("name-taken", f"{message.name!r} is bound to another key (peer ID {bound})")
            )
        if held is None and len(self.peers) >= limits.max_peers:
            raise _Refused(Error("server-full", f"{limits.max_peers} peers are registered"))
        allow_loopback = self.on_loopback or observed.address.is_loopback
        for endpoint in message.candidates:
            problem = candidate_problem(endpoint, allow_loopback)
            if problem is not None:
                raise _Refused(Error("bad-candidate", f"host candidate {endpoint} is {problem}"))
        return presented

    def _check_free(self, name: str, key: str, observed: Endpoint) -> None:
        """Raise ``name-taken`` unless no local peer holds ``name``, or only ``key``
        over another address family."""
        held = self.peers.get(name)
        if held is not None and (held.peer_id != key or observed.family in held.families):
            raise _Refused(Error("name-taken", f"{name!r} is held by a connected peer"))

    async def _limit_registrations(self, observed: Endpoint) -> None:
        """Raise ``rate-limited`` past ``registrations_per_minute`` from this source:
        counted in the cluster's Redis when there is one (else, or while it is
        unreachable, here)."""
        limits = self.limits
        if limits.is_exempt(observed.address):
            return
        source = source_key(observed.address)
        allowed = None
        if self.cluster is not None:
            try:
                most = limits.registrations_per_minute
                allowed = await self.cluster.allow("register", source, most, time.time())
            except ClusterUnavailable as exc:
                log.warning("%s: registration rate counted here only: %s", observed, exc)
        if allowed is None:
            allowed = self._registrations.allow(source, trio.current_time())
        if not allowed:
            raise _Refused(
                Error(
                    "rate-limited",
                    f"more than {limits.registrations_per_minute} registrations a minute "
                    f"from {source}",
                )
            )

    async def _claim(self, peer: _Peer) -> None:
        """Claim ``peer``'s name cluster-wide; raise ``name-taken`` if another
        process holds it. With Redis unreachable, the name is unique here only."""
        assert self.cluster is not None
        try:
            await self.cluster.claim(peer)
        except NameHeld as held:
            why = "is bound to another key" if held.bound else "is held by a connected peer"
            raise _Refused(
                Error("name-taken", f"{peer.name!r} {why} (peer ID {held.peer_id})")
            ) from None
        except ClusterUnavailable as exc:
            log.warning("%s: %r registered here only: %s", peer.observed, peer.name, exc)
        except BaseException:  # cancelled mid-claim (registration timeout): it may stand
            await self._release(peer)
            raise
        try:  # the claim awaited: a local registration may have taken the name meanwhile
            self._check_free(peer.name, peer.peer_id, peer.observed)
        except _Refused:
            await self._release(peer)
            raise

    async def _cluster_connections(self, source: str, observed: Endpoint) -> bool:
        """Count one more connection from ``source`` in Redis: False past the limit
        cluster-wide (True, the local count alone holding, while Redis is away)."""
        assert self.cluster is not None
        try:
            return await self.cluster.connect(source, self.limits.max_connections_per_ip)
        except ClusterUnavailable as exc:
            log.warning("%s: connections counted here only: %s", observed, exc)
            return True

    async def _cluster_disconnected(self, source: str) -> None:
        """Count one connection from ``source`` fewer in Redis, even while cancelled."""
        assert self.cluster is not None
        with trio.CancelScope(shield=True):
            try:
                await self.cluster.disconnect(source)
            except ClusterUnavailable as exc:
                log.info("%s: a closed connection not counted in the cluster: %s", source, exc)

    async def _release(self, peer: _Peer) -> None:
        """Take ``peer`` out of the cluster's registry, at most ``REDIS_TIMEOUT`` s, even
        while cancelled (the field would otherwise hold its name until our lease ends)."""
        if self.cluster is None or peer.cluster_field is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.cluster.release(peer)
            except ClusterUnavailable as exc:
                log.warning("%r: not released in the cluster: %s", peer.name, exc)

    async def lost(self, peer: _Peer, held: NameHeld) -> None:
        """Refuse ``peer`` (``name-taken``): another process took its name while
        Redis could not be reached, and claimed it first."""
        error = Error("name-taken", f"{peer.name!r} was taken by peer ID {held.peer_id}")
        await self._refuse(peer.channel, error, drain=False)

    async def deliver_forwarded(self, name: str, introduction: Introduction, frame: bytes) -> None:
        """Send an introduction another process made for our peer ``name``: ``frame``,
        its encoding as that process made it (decoded here: checked, not re-encoded)."""
        peer = self.peers.get(name)
        if peer is None:
            log.info("%r: a forwarded introduction for a peer no longer here", name)
            return
        try:
            frame = peer.channel.connection.send(introduction, frame)
        except LocalProtocolError as exc:
            log.info("%r: forwarded introduction not sent: %s", name, exc)
            return
        await self._deliver(peer, frame)

    async def _serve(self, peer: _Peer) -> bool:
        """Answer ``peer``'s messages until it closes (False), or, while
        :attr:`_parking` runs and the connection is plain TCP, until it has nothing
        more to read: then park it (True: its session goes on in :meth:`_resume`).
        Parked, any bytes that arrive restart the ``idle_timeout`` clock; with a
        task of its own (TLS), only whole messages do.

        Raises:
            _Refused: ``idle-timeout``: nothing received for ``idle_timeout`` s.
            RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError:
                as :meth:`ControlChannel.receive` does.
        """
        channel = peer.channel
        if self._parking.running and isinstance(channel.stream, trio.SocketStream):
            while True:
                try:
                    message = channel.receive_ready()
                except trio.WouldBlock:
                    self._parking.park(peer, channel.socket.fileno())
                    return True
                if message is None:
                    return False
                await self._answer(peer, message)
                await trio.lowlevel.checkpoint()  # a flood of frames still lets others run
        while True:
            with trio.move_on_after(self.limits.idle_timeout):
                message = await channel.receive_idle()
                if message is None:
                    return False
                await self._answer(peer, message)
                continue
            raise self._idle_timeout()

    def _idle_timeout(self) -> _Refused:
        idle = self.limits.idle_timeout
        return _Refused(Error("idle-timeout", f"nothing received for {idle:g} s"))

    async def _answer(self, peer: _Peer, message: Message) -> None:
        """Act on one message from a registered ``peer``."""
        if isinstance(message, ConnectRequest):
            await self._introduce(peer, message)
        elif isinstance(message, Report):
            peer.nat = message.nat
            log.info("%s: %r reports %s", peer.observed, peer.name, message.nat)
        else:
            assert isinstance(message, Keepalive)  # the only other client message

    async def _introduce(self, asker: _Peer, request: ConnectRequest) -> None:
        """Answer ``asker``'s request on its own connection; its candidates are those
        of every registration of its name (it may be a leg)."""
        requester = self.peers.get(asker.name, asker)
        target = self.peers.get(request.target)
        error = None
        if not self._introductions.allow(requester.name, trio.current_time()):
            error = Error(
                "rate-limited",
                f"more than {self.limits.introductions_per_minute} introductions a minute",
                request.request_id,
            )
        elif request.target == requester.name:
            error = Error("same-peer", "a peer cannot be introduced to itself", request.request_id)
        elif target is None and self.cluster is None:
            error = _unknown(request)
        if error is not None:
            await asker.channel.send(error)
            return
        if target is None:
            await self._introduce_remote(asker, requester, request)
            return
        (requester, to_requester), (target, to_target) = self.introductions(
            requester, target, request.request_id
        )
        _log_introduction(requester, target, to_target)
        if requester is self.peers.get(asker.name):
            requester = asker  # the answer goes back on the connection that asked
        ticket = self._ticket(request, to_target.attempt_id, requester.name, target.name)
        to_requester = self._dress(to_requester, request, ticket, requester)
        to_target = self._dress(to_target, request, ticket, target)
        # Both at the same moment: encoded first, so neither waits on the other's JSON.
        frames = (
            requester.channel.connection.send(to_requester),
            target.channel.connection.send(to_target),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, requester, frames[0])
            nursery.start_soon(self._deliver, target, frames[1])

    async def _introduce_remote(
        self, asker: _Peer, requester: _Peer, request: ConnectRequest
    ) -> None:
        """Introduce ``requester`` (the registration of ``asker``'s name that holds
        every leg's candidates) to a peer registered on another process: its
        introduction goes to that process through Redis in the same round trip that
        finds the peer (:meth:`punch.Cluster.introduce`), then ours leaves, so the two
        leave about one round trip to Redis apart (``make bench`` measures the skew)."""
        assert self.cluster is not None
        attempt_id, secret = _attempt()
        target_name = request.target
        ticket = self._ticket(request, attempt_id, requester.name, target_name)
        to_target = self._dress(
            _to_responder(requester, attempt_id, secret), request, ticket, asker
        )
        try:
            target = await self.cluster.introduce(target_name, to_target)
        except ClusterUnavailable as exc:
            error = Error("cluster-unavailable", str(exc)[:MAX_ERROR_TEXT], request.request_id)
            await asker.channel.send(error)
            return
        if target is None:  # nowhere, or its process died and its lease is not out yet
            await asker.channel.send(_unknown(request))
            return
        _log_introduction(requester, target, to_target)
        to_requester = _to_initiator(target, attempt_id, secret, request.request_id)
        to_requester = self._dress(to_requester, request, ticket, asker)
        await self._deliver(asker, asker.channel.connection.send(to_requester))

    def _ticket(
        self, request: ConnectRequest, attempt_id: bytes, requester: str, target: str
    ) -> tuple[bytes, bytes] | None:
        """The relay ticket and key of this attempt, if the request asks for a relay."""
        if request.relay_delay is None or self.relay is None:
            return None
        return self.relay.ticket(attempt_id, requester, target)

    def _dress(
        self,
        to: Introduction,
        request: ConnectRequest,
        ticket: tuple[bytes, bytes] | None,
        via: _Peer,
    ) -> Introduction:
        """``to`` with what the request asks for: the stream to upgrade, and a relay
        grant (``ticket``, at the address ``via`` reached us on)."""
        if request.upgrade is not None:
            to = attrs.evolve(to, upgrade=request.upgrade)
        if ticket is not None:
            assert request.relay_delay is not None
            to = attrs.evolve(to, relay=self._grant(via, *ticket, request.relay_delay))
        return to

    def introductions(
        self, requester: _Peer, target: _Peer, request_id: int
    ) -> tuple[tuple[_Peer, Introduction], tuple[_Peer, Introduction]]:
        """The two introductions of one attempt, each with the peer it goes to.

        A fresh attempt ID and secret; each side gets the other's candidates
        and registered certificate. (The lab's lying rendezvous,
        :mod:`netns.liar`, replaces this one method.)
        """
        attempt_id, secret = _attempt()
        to_requester = _to_initiator(target, attempt_id, secret, request_id)
        return (requester, to_requester), (target, _to_responder(requester, attempt_id, secret))

    def _grant(self, to: _Peer, ticket: bytes, key: bytes, delay: float) -> RelayGrant | None:
        """The relay grant in ``to``'s introduction: :attr:`relay_at`, else our relay
        port at the address ``to`` reached us on (None if its connection is gone)."""
        if self.relay_at is not None:
            return RelayGrant(self.relay_at, ticket, key, delay)
        try:
            here = Endpoint.from_sockaddr(to.channel.socket.getsockname())
        except OSError:
            return None
        return RelayGrant(Endpoint(here.ip, self.relay_port), ticket, key, delay)

    async def _deliver(self, peer: _Peer, frame: bytes) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                await peer.channel.send_frame(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%r: introduction not delivered: %s", peer.name, exc.__cause__ or exc)
                self._drop(peer)
        if scope.cancelled_caught:
            log.warning("%r: not reading; dropped after %g s", peer.name, SEND_TIMEOUT)
            self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        """Close ``peer``'s connection at once (an RST); whoever serves it ends its
        session: its own task, or, parked, a task woken for it first (a descriptor
        must leave the parking before it is closed)."""
        self._parking.wake(peer.channel.socket.fileno())
        reuse.abort(peer.channel.socket)

    async def say_goodbye(self) -> None:
        """Tell every registered peer ``shutting-down``, all at once, each bounded."""
        goodbye = Error("shutting-down", "the rendezvous server is shutting down")
        async with trio.open_nursery() as nursery:
            for held in list(self.peers.values()):
                for peer in (held, *held.legs):
                    nursery.start_soon(partial(self._refuse, peer.channel, goodbye, drain=False))

    @staticmethod
    async def _refuse(channel: ControlChannel, error: Error, *, drain: bool = True) -> None:
        """Best effort, at most :data:`REFUSAL_TIMEOUT` s: tell the peer why, then close.

        A lingering close: send the error and a FIN, then read and discard
        what the peer still sends until it closes too. Closing at once would
        answer its unread bytes with an RST, and an RST makes the peer's
        kernel drop the error frame before the peer reads it. With ``drain``
        off (another task is reading), only the error and the FIN.
        """
        with trio.move_on_after(REFUSAL_TIMEOUT):
            try:
                await channel.send(error)
                if isinstance(channel.stream, trio.SocketStream):
                    await channel.stream.send_eof()
                else:
                    await channel.stream.aclose()  # TLS: close_notify
                    return
                if not drain:
                    return
                drained = 0
                while drained < _DRAIN_LIMIT and (data := await channel.stream.receive_some()):
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                pass


def _adopt(channel: ControlChannel) -> None:
    """Give ``channel`` a socket object of its own for its descriptor, so that closing
    the stream it came with (``trio.serve_listeners`` closes each handler's stream
    when the handler returns) leaves the connection open: the old socket object is
    detached (then its close does nothing), the descriptor and the TCP connection
    stay as they are."""
    old = channel.socket
    fd = old.detach()
    channel.socket = trio.socket.from_stdlib_socket(
        socket.socket(old.family, old.type, old.proto, fileno=fd)
    )
    channel.stream = trio.SocketStream(channel.socket)


@attrs.define(eq=False)
class _Session:
    """What :meth:`RendezvousServer._session` yields: the channel, and whether the
    block kept it open (parked) rather than ending it."""

    channel: ControlChannel
    kept: bool = False


def _unknown(request: ConnectRequest) -> Error:
    return Error("unknown-peer", f"{request.target!r} is not registered", request.request_id)


def _attempt() -> tuple[bytes, bytes]:
    """A fresh attempt ID and secret."""
    return secrets.token_bytes(ATTEMPT_ID_BYTES), secrets.token_bytes(SECRET_BYTES)


def _to_initiator(
    target: _Peer | RemotePeer, attempt_id: bytes, secret: bytes, request_id: int
) -> Introduction:
    """The requester's introduction: the target's candidates and certificate."""
    return Introduction(
        target.name,
        Role.INITIATOR,
        attempt_id,
        secret,
        target.candidates,
        target.certificate,
        request_id,
        target.nat_facts,
    )


def _to_responder(requester: _Peer, attempt_id: bytes, secret: bytes) -> Introduction:
    """The target's introduction: the requester's candidates and certificate."""
    return Introduction(
        requester.name,
        Role.RESPONDER,
        attempt_id,
        secret,
        requester.candidates,
        requester.certificate,
        peer_nat=requester.nat_facts,
    )


def _log_introduction(
    requester: _Peer, target: _Peer | RemotePeer, to_target: Introduction
) -> None:
    log.info(
        "introducing %r (%s) to %r (%s), attempt %s",
        requester.name,
        requester.observed,
        target.name,
        target.observed,
        to_target.attempt_id.hex()[:8],
    )


def _server_listener(
    bind: Endpoint, dual_stack: bool, reuse_port: bool = False
) -> trio.SocketListener:
    """A listening socket on ``bind`` (``SO_REUSEADDR``, as trio's own); an IPv6
    unspecified one takes IPv4 too when ``dual_stack`` and the OS allows it.
    With ``reuse_port``, ``SO_REUSEPORT`` too: processes of one user that each
    listen there share the connections, balanced by the kernel (socket(7))."""
    sock = socket.socket(bind.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind.family == socket.AF_INET6:
            both = dual_stack and bind.address.is_unspecified
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if both else 1)
            except OSError:
                log.info("%s: this OS keeps IPv6 sockets IPv6-only", bind)
        sock.bind(bind.sockaddr())
        sock.listen(SERVER_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _port_listeners(
    binds: list[Endpoint], port: int, dual_stack: bool
) -> list[trio.SocketListener]:
    """One probe (or relay) listener per listening address, on ``port`` (0: the
    first one's choice for all); ``SO_REUSEPORT``, since a Reach dials from the same port.
    A dual-stack ``[::]`` gets an IPv4 ``0.0.0.0`` one beside it, since a
    reusable IPv6 socket is IPv6-only."""
    addresses = [b.ip for b in binds]
    if dual_stack and any(b.family == socket.AF_INET6 and b.address.is_unspecified for b in binds):
        addresses.append("0.0.0.0")
    listeners: list[trio.SocketListener] = []
    try:
        for ip in addresses:
            listeners.append(reuse.open_listener(Endpoint(ip, port), SERVER_BACKLOG))
            port = port or listeners[0].socket.getsockname()[1]
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def serve_rendezvous(
    host: str = "0.0.0.0",
    port: int = 0,
    *,
    limits: ServerLimits | None = None,
    ssl_context: ssl.SSLContext | None = None,
    stop: trio.Event | None = None,
    registration_timeout: float | None = None,
    persist_names: str | os.PathLike[str] | None = None,
    listen: Sequence[Endpoint | tuple[str, int] | str] = (),
    bound: list[Endpoint] | None = None,
    probe_port: int | None = None,
    probe_bound: list[Endpoint] | None = None,
    relay_port: int | None = None,
    relay: Relay | None = None,
    relay_bound: list[Endpoint] | None = None,
    relay_at: Endpoint | None = None,
    redis: str | Cluster | None = None,
    redis_prefix: str = "punch",
    reuse_port: bool = False,
    task_status: trio.TaskStatus[Endpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a rendezvous server until cancelled, or until ``stop`` is set.

    Follows trio's ``nursery.start`` protocol::

        bound = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)

    Args:
        host: IP address to listen on (default all IPv4 interfaces).
        port: TCP port, 0..65535; 0 lets the kernel choose.
        listen: endpoints to listen on instead of ``host``/``port`` (one
            socket each, e.g. ``["0.0.0.0:7000", "[::]:7000"]``). ``[::]``
            with no IPv4 endpoint beside it serves both families on one
            dual-stack socket (``IPV6_V6ONLY`` off, ipv6(7)); IPv4 peers then
            appear as IPv4-mapped addresses, which :class:`Endpoint` turns
            into IPv4 ones, so limits, candidates and logs see IPv4.
        limits: :class:`ServerLimits` (default: every default limit).
        ssl_context: serve TLS with it (``ssl.PROTOCOL_TLS_SERVER`` with
            ``load_cert_chain``); the introductions carry secrets
            (RFC 8445 §19.2), so use it on untrusted networks.
        stop: set it to shut down gracefully: stop accepting, tell every
            registered peer ``shutting-down`` (at most :data:`SHUTDOWN_GRACE`
            seconds), close every connection, return.
        registration_timeout: shorthand for ``limits.registration_timeout``.
        persist_names: a file (:class:`NameBindings`) that keeps each name
            bound to the key that first registered it, across disconnects and
            restarts (trust on first use); default: names are bound only while
            their holder is connected.
        bound: a list that gets every bound :class:`Endpoint`, in ``listen``'s
            order, before ``task_status`` is told.
        probe_port: also listen on this TCP port (0..65535; 0: the kernel
            chooses one) of every listening address, for :func:`punch.natcheck`:
            each connection there is told its observed endpoint (a second one,
            to compare with the control connection's: RFC 4787 §4.1 mapping),
            and may ask once to be dialled back from this port (the filtering
            test, RFC 4787 §5; only the address it came from, at most
            :data:`REACH_TIMEOUT` s, :data:`MAX_REACHES` at once). Plain TCP,
            also beside ``ssl_context``: it tells nothing secret. ``None``
            (default): no probe port.
        probe_bound: a list that gets every bound probe :class:`Endpoint`.
        relay_port: also run a relay (:mod:`punch._relay`) on this TCP port
            (0..65535; 0: the kernel chooses one) of every listening address:
            an introduction whose request asks for a relay then carries a
            grant to it (RFC 8445 §5.1.1.2 relayed candidate), and the two
            peers' streams bound to it are spliced, their payload unread.
            Plain TCP: what it carries is the peers' own TLS. ``None``
            (default): no relay.
        relay: the :class:`~punch.Relay` to run there (its limits and grant
            secret; default ``Relay()``: every default limit, a fresh secret).
        relay_bound: a list that gets every bound relay :class:`Endpoint`.
        relay_at: the endpoint of a relay run elsewhere (:func:`serve_relay`,
            ``punch-relay``) that grants name instead of ours; ``relay`` must
            then hold that relay's secret (``Relay(secret=...)``).
        redis: a Redis URL (``redis://host:6379/0``, ``unix:///path``), or a
            :class:`punch.Cluster`: share the registry with every
            other server given the same Redis and ``redis_prefix``
            (:mod:`punch._cluster`): names are unique across them, the
            per-source limits (connections, registrations a minute) are
            counted across them, and a peer can be introduced to one
            registered on any of them. With
            ``persist_names`` (any value), names are bound to keys in Redis
            instead of a file. ``None`` (default): this process alone.
        redis_prefix: the prefix of the cluster's keys and channels.
        reuse_port: listen with ``SO_REUSEPORT`` (socket(7)), so several
            processes serve one port (``punch-rendezvous --workers``).
        task_status: receives the (first) bound :class:`Endpoint` once listening.

    Raises:
        TypeError, ValueError: a bad argument, a ``persist_names`` file
            with a malformed line, or ``relay_at`` without ``relay``.
        OSError: the listening socket could not be opened (``EADDRINUSE``…),
            or ``persist_names`` cannot be read.
        punch.ClusterUnavailable: ``redis`` does not answer at start.
    """
    binds = [as_endpoint(e, "listen") for e in listen] or [Endpoint(host, port)]  # validated
    if relay_at is not None and relay is None:
        raise ValueError("relay_at needs relay=punch.Relay(secret=...): that relay's secret")
    limits = limits or ServerLimits()
    if registration_timeout is not None:
        limits = attrs.evolve(limits, registration_timeout=registration_timeout)
    cluster = redis
    if isinstance(cluster, str):
        cluster = Cluster(cluster, redis_prefix, persist_names=persist_names is not None)
    if cluster is not None:
        persist_names = None
    bindings = NameBindings(Path(persist_names)) if persist_names is not None else None
    on_loopback = all(b.address.is_loopback for b in binds)
    dual_stack = not any(b.family == socket.AF_INET for b in binds)
    listeners: list[trio.SocketListener] = []
    probes: list[trio.SocketListener] = []
    relays: list[trio.SocketListener] = []
    try:
        for bind in binds:
            listeners.append(_server_listener(bind, dual_stack, reuse_port))
        if probe_port is not None:
            probes = _port_listeners(binds, probe_port, dual_stack)
        if relay_port is not None:
            relays = _port_listeners(binds, relay_port, dual_stack)
    except BaseException:
        for listener in (*listeners, *probes):
            listener.socket.close()
        raise
    relay_endpoints = [Endpoint.from_sockaddr(r.socket.getsockname()) for r in relays]
    server = RendezvousServer(
        limits,
        ssl_context,
        on_loopback,
        bindings,
        relay=(relay or Relay()) if relays or relay_at is not None else None,
        relay_port=relay_endpoints[0].port if relays else 0,
        relay_at=relay_at,
        cluster=cluster,
    )
    endpoints = [Endpoint.from_sockaddr(listener.socket.getsockname()) for listener in listeners]
    for where in endpoints:
        log.info("rendezvous listening on %s%s", where, " (TLS)" if ssl_context else "")
    probe_endpoints = [Endpoint.from_sockaddr(p.socket.getsockname()) for p in probes]
    for where in probe_endpoints:
        log.info("probe port listening on %s", where)
    for where in relay_endpoints:
        log.info("relay listening on %s", where)
    if relay_bound is not None:
        relay_bound[:] = relay_endpoints
    if bound is not None:
        bound[:] = endpoints
    if probe_bound is not None:
        probe_bound[:] = probe_endpoints
    try:
        async with trio.open_nursery() as handlers:
            await handlers.start(server.park_idle)
            if cluster is not None:
                await handlers.start(cluster.run, server.deliver_forwarded, server.lost)
            await _serve_until(
                server, handlers, listeners, probes, relays, stop, endpoints[0], task_status
            )
    finally:
        for listener in (*listeners, *probes, *relays):
            listener.socket.close()


async def _serve_until(
    server: RendezvousServer,
    handlers: trio.Nursery,
    listeners: list[trio.SocketListener],
    probes: list[trio.SocketListener],
    relays: list[trio.SocketListener],
    stop: trio.Event | None,
    first: Endpoint,
    task_status: trio.TaskStatus[Endpoint],
) -> None:
    """Accept on every listener until ``stop``; then the graceful shutdown."""
    async with trio.open_nursery() as acceptor:
        serve = partial(trio.serve_listeners, server.handle, listeners, handler_nursery=handlers)
        await acceptor.start(serve)
        if probes:
            serve_probes = partial(
                trio.serve_listeners, server.handle_probe, probes, handler_nursery=handlers
            )
            await acceptor.start(serve_probes)
        if relays:
            serve_relays = partial(
                trio.serve_listeners, server.handle_relay, relays, handler_nursery=handlers
            )
            await acceptor.start(serve_relays)
        task_status.started(first)
        if stop is None:
            await trio.sleep_forever()
        await stop.wait()
        acceptor.cancel_scope.cancel()
    log.info("shutting down: %d peer(s) registered", len(server.peers))
    for listener in (*listeners, *probes, *relays):
        await listener.aclose()
    with trio.move_on_after(SHUTDOWN_GRACE):
        await server.say_goodbye()
    if server.cluster is not None:
        await server.cluster.leave()
    handlers.cancel_scope.cancel()


async def serve_relay(
    listen: Sequence[Endpoint | tuple[str, int] | str],
    relay: Relay,
    *,
    limits: ServerLimits | None = None,
    bound: list[Endpoint] | None = None,
    task_status: trio.TaskStatus[Endpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay alone (``punch-relay``), for a rendezvous elsewhere that announces
    it (:func:`serve_rendezvous` ``relay_at``) and shares its secret; until cancelled.

    Args:
        listen: endpoints to listen on (``"0.0.0.0:7002"``...; port 0: the kernel's choice).
        relay: its :class:`~punch.Relay`: limits, and the secret the rendezvous mints
            grants with.
        limits: :class:`ServerLimits` for its connections (per-IP limit, exempt networks).
        bound: a list that gets every bound :class:`Endpoint`.
        task_status: receives the first bound :class:`Endpoint` once listening.

    Raises:
        TypeError, ValueError: a bad endpoint.
        OSError: a listening socket could not be opened.
    """
    binds = [as_endpoint(e, "listen") for e in listen]
    if not binds:
        raise ValueError("listen: at least one endpoint")
    dual_stack = not any(b.family == socket.AF_INET for b in binds)
    server = RendezvousServer(limits or ServerLimits(), relay=relay)
    listeners: list[trio.SocketListener] = []
    try:
        for bind in binds:
            listeners.append(_server_listener(bind, dual_stack))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    endpoints = [Endpoint.from_sockaddr(listener.socket.getsockname()) for listener in listeners]
    for where in endpoints:
        log.info("relay listening on %s", where)
    if bound is not None:
        bound[:] = endpoints
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, server.handle_relay, listeners))
        task_status.started(endpoints[0])
