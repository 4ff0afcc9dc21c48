"""The race: accept on our port against paced connects to every candidate.

One trio nursery per punch attempt, the shape of ``trio.open_tcp_stream``'s
happy eyeballs: every path runs as its own task and records its own error;
the first authenticated stream that the initiator nominates wins; every other
stream is closed with an RST; if the deadline passes first, the caller gets one
:class:`PunchFailed` whose cause groups each candidate's error.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import attrs
import trio

from . import _birthday, _relay, reuse
from ._birthday import DialFn
from ._candidates import Selection, Skipped, select_candidates
from ._endpoint import Candidate, CandidateType, Endpoint, Role
from ._errors import (
    CandidateFailed,
    HandshakeError,
    HandshakeInterrupted,
    PunchFailed,
    SelfDialError,
    _describe,
)
from ._handshake import HELLO_SIZE, Handshake, Hello, Stage, parse_hello
from ._nat import NatFacts, predict
from ._outcome import REFUSALS, Attempt, Outcome
from ._protocol import MAX_RELAY_DELAY, Introduction, RelayGrant
from ._stream import ExactReader, PeerStream, StreamPath, WonBy
from ._tls import TLSStream

log = logging.getLogger("punch.race")

DEFAULT_TIMEOUT = 10.0
"""Seconds a punch may take, introduction to nominated stream."""
DEFAULT_PACING = 0.1
"""Seconds between the starts of two connect attempts to one candidate (10/s).

Against NATs that answer unsolicited SYNs with RST, the two peers' SYNs must
cross within about one round trip between the NATs. Both start at their
introduction, which the rendezvous sends at once, so the first SYNs usually
do (10/10 in the lab at 10 ms round trips); after that the schedules drift
apart with scheduling noise, sweeping the phase. In a lab with no delay
(a window of tens of microseconds), random jitter on the gaps fell to 3/20
and a fixed grid to 17/20, against about 31/33 for this plain schedule.
A refused attempt is followed sooner, :data:`MIN_PACING` after its start."""
# An attempt that gets no answer is left to the kernel's own SYN retransmissions
# (RFC 6298: 1, 3, 7 s...) until the deadline, and never aborted and re-dialled:
# a fresh socket has a fresh ISN, which a stateful NAT (Linux conntrack) that
# still tracks the old one marks INVALID, while the peer's half-open connection
# for the old ISN holds the 4-tuple (EADDRNOTAVAIL). Measured in the netns lab
# under 20% loss; see README.md, "NAT compatibility".
STUCK_AFTER_REFUSAL = 1.0
"""Seconds before an attempt that follows a refused one (RST) is aborted and
dialled again. There the peer's NAT answers, so silence means our SYN hit a
conntrack entry that an earlier RST left closed, and the kernel's retransmits of
the same SYN would be dropped the same way until the deadline; a fresh socket's
SYN reopens it. No half-open peer connection can hold the 4-tuple in that case."""
MIN_PACING = 0.05
"""Pacing below 50 ms (20 attempts/s per candidate) is refused (RFC 8445 §14).

It is also the gap after an attempt that was refused (an RST or an ICMP
unreachable, :data:`punch._outcome.REFUSALS`): the next attempt starts as soon as the rate
allows instead of after the full pacing. Behind a NAT that answers unsolicited
SYNs with an ICMP error, a refusal means the peer has not dialled yet; its SYN
arrives later, and our NAT lets it in through the entry our refused SYN made,
which tracks that SYN's sequence numbers. A fresh socket's SYN re-initialises
the entry while it is in SYN_SENT; once the peer's SYN has met it (SYN_SENT2),
only segments within the tracked window pass (Linux nf_conntrack_proto_tcp.c;
an ISN clock runs at 15.6 M/s, RFC 6528). So the next attempt reuses the
refused socket, whose SYN continues its sequence (:class:`punch.reuse.Redial`),
and from our first dial to that candidate until the race ends, our listener
drops its SYNs (:meth:`InboundRouter.drop_syns_from`; the refusal can come
back after the peer's SYN has arrived): its SYN-ACK would carry a fresh ISN,
and its half-open connection would hold the 4-tuple against our next dial
(``EADDRNOTAVAIL``). The peer's dropped SYN is retransmitted, and our next
attempt crosses it in a simultaneous open. Measured in the netns lab: with no
WAN delay, `cone x cone-icmp, responder +50 ms` went from 0 of 10 trials to 10
of 10; at 10 ms round trips with both cores busy, the ICMP-refusing matrix
cells from 76 of 80 to 80 of 80 (README, "Timing sweep").

A refusal by an RST closed our NAT's entry as it passed, so our NAT too now
refuses the peer's SYN, and each SYN that reaches the peer's NAT before the
peer's own has left draws another RST: two such NATs connect only when the two
SYNs cross within a round trip between them (tens of microseconds with no
delay). So the attempt after an RST that came back within
:data:`PRIME_BELOW` goes at once and is a priming SYN
(:func:`punch.reuse.prime`): it reopens our NAT's entry and expires before the
peer's NAT, and the attempt after it connects the same socket, as after an
ICMP refusal. The peer's SYN then finds our NAT open, and our next SYN finds
the peer's open. Measured in the netns lab, `cone-rst x cone-rst` with no WAN
delay: from 8 of 15 trials (five cells, 3 each) to 30 of 30 (6 each), median
63 ms where both start together. Priming SYNs count as attempts
(:data:`MAX_ATTEMPTS_PER_SECOND`)."""
PRIME_BELOW = 0.005
"""Seconds: an RST that came back sooner is followed by a priming SYN (see
:data:`MIN_PACING`). Two SYNs cross when they leave within about one round trip
of each other: below 5 ms that is under a tenth of the 50 ms pacing, and two
peers retrying in step rarely meet (the zero-delay `cone-rst x cone-rst` cells:
7 to 13 trials in 15). Above it the next plain SYN crosses the peer's often
enough, and priming measured worse in the netns lab: at 50 ms round trips it
delayed that SYN by 50 ms (`cone x cone-rst, 25 ms, responder +50 ms`: median
272 ms primed against 218 ms not), and at 10 ms round trips `cone-icmp-admin x
cone-rst` failed 1 trial in 3, where unprimed it connects 10 in 10."""
MAX_ATTEMPTS_PER_SECOND = round(1 / MIN_PACING)
"""Attempts to one candidate that may start within any one second (20, as
:data:`MIN_PACING` spaces them), priming SYNs included: a priming SYN goes at
once after an RST, so the cap, not the gap, bounds that rate."""
NOMINATION_GRACE = 3.0
"""Seconds past its deadline a responder keeps waiting while a stream that got
our Proof lacks only the Nomination: a lost Nomination comes again a
retransmission timeout later (at most 1 s later while the punch lasts, see
:func:`punch.reuse.cap_retransmission_timeout`)."""
DEFAULT_STAGGER = 0.1
"""Seconds IPv4 candidates wait while IPv6 ones are dialled: RFC 8305's
"connection attempt delay" (§5), at its recommended minimum (§8: 100 ms; its
default is 250 ms for a connect, and a punch that works takes about two round
trips, so the wait is kept short)."""
MIN_STAGGER, MAX_STAGGER = 0.01, 2.0
"""RFC 8305 §8: the connection attempt delay MUST NOT be under 10 ms and SHOULD
NOT be over 2 s."""
HELLO_TIMEOUT = 5.0
"""Seconds an accepted connection gets to send its Hello before it is dropped."""
MAX_PENDING_HELLOS = 64
"""Accepted connections awaiting their Hello at once; more are dropped at once."""
MAX_REPORTED_INBOUND = 8
"""Failed inbound streams kept for :class:`PunchFailed`'s cause; the rest are only logged."""

_ROUTE_BUFFER = 8


_Validator = Callable[[object, "attrs.Attribute[float]", float], None]


class RelayMode(enum.Enum):
    """Whether a punch may end on a relayed stream (:mod:`punch._relay`)."""

    FALLBACK = "fallback"
    """Direct paths first; the relay too once :attr:`PunchOptions.relay_stagger`
    has passed (at once where no direct path can exist), the first stream
    authenticated wins."""
    NEVER = "never"
    """Direct paths only: no relay is asked for, and a peer's grant is ignored."""
    ONLY = "only"
    """The relay at once, no direct path (the initiator's choice; a responder
    follows the grant it is given)."""


DEFAULT_RELAY_STAGGER = 2.0
"""Seconds the relay waits while the direct paths race (:class:`RelayMode`
``fallback``): a punch that works takes tens of milliseconds (median 0.65-3 s
for a birthday punch, README), and the relay carries every byte twice."""


def _seconds(minimum: float, inclusive: bool) -> _Validator:
    """An attrs validator: finite seconds, a real number (not a bool), above ``minimum``."""

    def check(_: object, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{attribute.name} must be seconds as a float, not {value!r}")
        low_ok = value >= minimum if inclusive else value > minimum
        if not (low_ok and value < math.inf):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ValueError(f"{attribute.name} must be finite seconds {bound}, not {value!r}")

    return check


@attrs.frozen
class PunchOptions:
    """How a host punches: every client knob, validated once, when it is built.

    Args:
        timeout: seconds (float, finite, > 0) one punch may take, introduction
            to nominated stream; :meth:`punch.Host.connect` waits as long again
            for the introduction. Default :data:`DEFAULT_TIMEOUT` (10 s). A
            responder holding a stream that lacks only the Nomination waits
            up to :data:`NOMINATION_GRACE` (3 s) past it.
        pacing: seconds (float, finite, >= :data:`MIN_PACING`, 0.05) between
            the starts of two connect attempts to one candidate (RFC 8445 §14);
            default :data:`DEFAULT_PACING` (0.1 s).
        encrypt: run TLS 1.3 with the peer's registered key after the
            nomination, and require the peer to (default True); False gives
            the plaintext stream to applications that bring their own
            security. Both peers must agree: a mismatch is refused.
        stagger: seconds (float, :data:`MIN_STAGGER` 0.01 to :data:`MAX_STAGGER`
            2.0) the IPv4 candidates wait while IPv6 ones are dialled, when the
            race has both (RFC 8305 §5 happy eyeballs); default
            :data:`DEFAULT_STAGGER` (0.1 s). IPv4 starts earlier once every
            IPv6 candidate has failed an attempt. The peer staggers alike, so
            the two sides' IPv4 SYNs still start together.
        relay: :class:`RelayMode` or its value, ``"fallback"`` (default),
            ``"never"`` or ``"only"``: whether the punch may end on a stream
            through the rendezvous's relay, when it has one
            (``punch-rendezvous --relay``).
        relay_stagger: seconds (0 to 60) the relay waits while the direct
            paths race, in ``fallback``; default :data:`DEFAULT_RELAY_STAGGER`
            (2 s). The initiator's counts: the introduction tells the
            responder. Where both NATs are known to allow no direct path
            (:func:`punch._birthday.no_direct_path`), the relay goes at once.

    Raises:
        TypeError: a value that is not a real number (``True`` included).
        ValueError: a value out of its range, or an unknown ``relay`` mode.
    """

    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_seconds(0.0, inclusive=False))
    pacing: float = attrs.field(
        default=DEFAULT_PACING, validator=_seconds(MIN_PACING, inclusive=True)
    )
    encrypt: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    stagger: float = attrs.field(default=DEFAULT_STAGGER, validator=_seconds(MIN_STAGGER, True))
    relay: RelayMode = attrs.field(default=RelayMode.FALLBACK, converter=RelayMode)
    relay_stagger: float = attrs.field(
        default=DEFAULT_RELAY_STAGGER, validator=_seconds(0.0, inclusive=True)
    )

    @relay_stagger.validator
    def _check_relay_stagger(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value > MAX_RELAY_DELAY:
            raise ValueError(f"relay_stagger must be <= {MAX_RELAY_DELAY:g} s, not {value!r}")

    @property
    def relay_delay(self) -> float | None:
        """What a ConnectRequest asks: seconds until both dial the relay, or None."""
        if self.relay is RelayMode.NEVER:
            return None
        return 0.0 if self.relay is RelayMode.ONLY else self.relay_stagger

    @stagger.validator
    def _check_stagger(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value > MAX_STAGGER:
            raise ValueError(f"stagger must be <= {MAX_STAGGER:g} s (RFC 8305 §8), not {value!r}")


class PrimeFn(Protocol):
    """The shape of :func:`punch.reuse.prime`, which tests swap for fakes."""

    def __call__(
        self, local: Endpoint, remote: Endpoint, redial: reuse.Redial, own: Iterable[Endpoint]
    ) -> None: ...


@attrs.frozen
class Inbound:
    """An accepted connection whose Hello has been read."""

    reader: ExactReader
    hello: Hello
    remote: Endpoint
    raw_hello: bytes
    """The Hello's :data:`HELLO_SIZE` bytes, for the race's :class:`Handshake`."""


def _endpoints(value: Endpoint | Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    return (value,) if isinstance(value, Endpoint) else tuple(value)


def _peer(stream: trio.SocketStream) -> Endpoint:
    return Endpoint.from_sockaddr(stream.socket.getpeername())


@attrs.define(eq=False)
class InboundRouter:
    """Listens on a host's port while a punch needs it, and routes each connection.

    The attempt is named by the attempt id in the connection's Hello, so one
    listener serves any number of concurrent attempts. A connection with no
    Hello within :data:`HELLO_TIMEOUT`, a malformed one, or one for no live
    attempt is closed with an RST.

    The listener exists only while at least one route is open (or
    :meth:`listen_meanwhile` holds it): it opens with the first route and
    closes with the last. Between punches nothing of ours listens on the
    port, so ``SO_REUSEPORT`` (socket(7)) never spreads another same-user
    process's inbound connections on that port to us. Measured in
    the lab's cone-rst x cone-rst cell at 10 ms round trips: 12/12 punched
    with the listener opened per punch. (In a lab with no delay it had
    looked costly, 8/30 against 24/40, but there that cell varied from 2/10
    to 9/10 run to run with either listener, see ``netns/delay.py``.)

    Args:
        locals: the endpoints to listen on, one per family (a single
            :class:`Endpoint` is taken too), shared with our dials (sockets of
            the caller's keep the ports bound meanwhile).
    """

    locals: tuple[Endpoint, ...] = attrs.field(converter=_endpoints)
    _routes: dict[
        bytes, tuple[trio.MemorySendChannel[Inbound], trio.MemoryReceiveChannel[Inbound]]
    ] = attrs.field(factory=dict, init=False)
    _pending_hellos: int = attrs.field(default=0, init=False)
    _holds: int = attrs.field(default=0, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _listeners: list[tuple[trio.SocketListener, trio.CancelScope]] = attrs.field(
        factory=list, init=False
    )
    _dropped: collections.Counter[Endpoint] = attrs.field(factory=collections.Counter, init=False)

    @property
    def listening(self) -> bool:
        """Whether a listener is open on :attr:`locals` now."""
        return bool(self._listeners)

    def open_route(self, attempt_id: bytes) -> trio.MemoryReceiveChannel[Inbound]:
        """Start routing connections whose Hello names ``attempt_id``; listen if not yet.

        Open the route before the introduction is acted on, so that no
        inbound Hello can arrive ahead of it; close it with :meth:`close_route`.
        If the listener cannot be opened (``EMFILE``...), the route still
        opens: the punch goes on by its dials (simultaneous open needs none).
        """
        if attempt_id not in self._routes:
            self._routes[attempt_id] = trio.open_memory_channel[Inbound](_ROUTE_BUFFER)
            self._listen()
        return self._routes[attempt_id][1]

    def close_route(self, attempt_id: bytes) -> None:
        """Stop routing ``attempt_id``; connections still queued are closed.

        Closing the last route closes the listener.
        """
        route = self._routes.pop(attempt_id, None)
        if route is None:
            return
        send, receive = route
        send.close()
        while True:
            try:
                reuse.abort(receive.receive_nowait().reader.stream.socket)
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        receive.close()
        self._stop_listening_if_idle()

    @contextlib.contextmanager
    def listen_meanwhile(self) -> Iterator[None]:
        """Listen meanwhile, routes or not: what an initiator's :meth:`punch.Host.connect`
        holds while its request for an introduction is on the way, so the listener
        is open before the introduction arrives and its route costs no listener
        then (netns lab, 10 ms round trips: the reader's share of an introduction,
        route included, took 0.21 ms with the listener opened on arrival, 0.08 ms
        with it open ahead; medians of 20 and 40 trials). Inbound connections
        meanwhile are routed as ever: those for no open route are reset."""
        self._holds += 1
        self._listen()
        try:
            yield
        finally:
            self._holds -= 1
            self._stop_listening_if_idle()

    def _stop_listening_if_idle(self) -> None:
        """Close the listeners once no route is open and nothing holds them."""
        if not self._routes and not self._holds:
            self._stop_listening()

    @property
    def dropping(self) -> frozenset[Endpoint]:
        """The endpoints whose SYNs the listener drops now (:meth:`drop_syns_from`)."""
        return frozenset(self._dropped)

    def drop_syns_from(self, remote: Endpoint) -> None:
        """Leave SYNs from ``remote`` unanswered (:func:`punch.reuse.drop_syns_from`)
        until as many :meth:`stop_dropping_syns_from` calls; a race calls it at its
        first dial of a candidate (see :data:`MIN_PACING`). Beyond
        :data:`punch.reuse.MAX_DROPPED_SOURCES` endpoints, the newest are not dropped."""
        if remote not in self._dropped and len(self._dropped) >= reuse.MAX_DROPPED_SOURCES:
            log.debug("not dropping SYNs from %s: %d endpoints dropped", remote, len(self._dropped))
            return
        self._dropped[remote] += 1
        if self._dropped[remote] == 1:
            self._filter()

    def stop_dropping_syns_from(self, remote: Endpoint) -> None:
        """Undo one :meth:`drop_syns_from` call."""
        if remote not in self._dropped:
            return
        self._dropped[remote] -= 1
        if not self._dropped[remote]:
            del self._dropped[remote]
            self._filter()

    def _filter(self, listeners: Iterable[trio.SocketListener] | None = None) -> None:
        for listener in listeners or [listener for listener, _ in self._listeners]:
            try:
                reuse.drop_syns_from(listener.socket, self._dropped)
            except OSError as exc:
                log.warning("cannot filter SYNs on %s: %s", listener.socket.getsockname(), exc)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the router (until cancelled): its accept loop and Hello readers live here."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self._stop_listening()

    def _listen(self) -> None:
        if self._listeners or self._nursery is None:
            return
        for local in self.locals:
            try:
                listener = reuse.open_listener(local)
            except OSError as exc:
                log.warning("cannot listen on %s: %s; dialling only", local, exc)
                continue
            if self._dropped:
                self._filter([listener])
            self._listeners.append((listener, trio.CancelScope()))
            self._nursery.start_soon(self._accept, *self._listeners[-1])
            log.debug("listening on %s", local)

    def _stop_listening(self) -> None:
        """Close the listeners now: the kernel resets what waits in their backlogs."""
        if self._listeners:
            log.debug("stopped listening on %s", ", ".join(map(str, self.locals)))
        for listener, accepting in self._listeners:
            accepting.cancel()
            listener.socket.close()
        self._listeners.clear()

    async def _accept(self, listener: trio.SocketListener, scope: trio.CancelScope) -> None:
        """Accept on ``listener`` until :meth:`_stop_listening` cancels ``scope``.

        A route opened and closed with no checkpoint between (a race that fails
        before its first dial) stops the listener before this task first runs,
        perhaps after :meth:`serve` has ended: then there is nothing to do."""
        if self._nursery is None or scope.cancel_called:
            listener.socket.close()
            return
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for a slot
                    log.warning("accept failed: %s; retrying in 0.1 s", exc)
                    await trio.sleep(0.1)
                    continue
                if self._pending_hellos >= MAX_PENDING_HELLOS:
                    log.warning(
                        "dropping inbound connection: %d hellos pending", MAX_PENDING_HELLOS
                    )
                    reuse.abort(stream.socket)
                    continue
                if self._nursery is None:  # serve ended as this connection came
                    reuse.abort(stream.socket)
                    return
                self._pending_hellos += 1
                reuse.cap_retransmission_timeout(stream.socket)
                self._nursery.start_soon(self._read_hello, stream)

    async def _read_hello(self, stream: trio.SocketStream) -> None:
        reader = ExactReader(stream)
        delivered = False
        try:
            remote = _peer(stream)
            with trio.move_on_after(HELLO_TIMEOUT) as scope:
                raw = await reader.exactly(HELLO_SIZE)
                hello = parse_hello(raw)
            if scope.cancelled_caught:
                log.info("inbound from %s: no hello within %.1f s, dropped", remote, HELLO_TIMEOUT)
                return
            route = self._routes.get(hello.attempt_id)
            if route is None:
                log.info("inbound from %s: hello for no current attempt, dropped", remote)
                return
            route[0].send_nowait(Inbound(reader, hello, remote, raw))
            delivered = True
        except (OSError, trio.WouldBlock, trio.BrokenResourceError) as exc:
            log.info("inbound connection dropped: %s", _describe(exc))
        finally:
            self._pending_hellos -= 1
            if not delivered:
                reuse.abort(stream.socket)


NO_PATH_TIMEOUT = 2.0
"""Seconds a race lasts when both IPv4 NATs map endpoint-dependent, one at random
(:func:`punch._birthday.no_direct_path`), and no IPv6 candidate is dialled: only
host candidates are, for a shared LAN, which answers within milliseconds; 2 s
covers one lost SYN (retransmitted after 1 s, RFC 6298 §2.1)."""
NO_PATH = "both NATs map endpoint-dependent, one at random: no direct path but a shared LAN"
BIRTHDAY_INSTEAD = "its NAT's other ports are probed instead (birthday punching)"
RELAY_ONLY = "relay 'only': no direct path is tried"


def _without_srflx_v4(selection: Selection, why: str) -> Selection:
    """``selection`` without its IPv4 server-reflexive candidates, skipped for ``why``:
    an endpoint-dependent NAT's public port is its mapping toward the rendezvous only
    (RFC 4787 §4.1)."""

    return Selection(
        tuple(c for c in selection.dial if not _is_srflx_v4(c)),
        selection.skipped + tuple(Skipped(c, why) for c in selection.dial if _is_srflx_v4(c)),
    )


def _is_srflx_v4(candidate: Candidate) -> bool:
    family = candidate.endpoint.family
    return candidate.type is CandidateType.SERVER_REFLEXIVE and family == socket.AF_INET


def _srflx_v4(dial: Iterable[Candidate]) -> Endpoint | None:
    """The first IPv4 server-reflexive candidate's endpoint (a NAT's public side)."""
    return next((c.endpoint for c in dial if _is_srflx_v4(c)), None)


def _kind(error: BaseException | None) -> tuple[type[BaseException] | None, int | None]:
    """What counts as "the same outcome" for two attempts: class and errno."""
    return (type(error) if error is not None else None, getattr(error, "errno", None))


def _redial_for(candidate: Candidate) -> reuse.Redial | None:
    """Where this candidate's refused sockets are kept (:class:`punch.reuse.Redial`),
    or None for an IPv4 host candidate: a private address, reached without a NAT
    if at all, refused by a router's ICMP where it is not. Keeping those sockets
    cost the zero-delay `cone-rst x cone-rst` cell 16/16 -> 12/16 (netns sweep,
    2026-12-02), whose SYNs must cross within about 100 us."""
    if candidate.type is CandidateType.HOST and candidate.endpoint.family == socket.AF_INET:
        return None
    return reuse.Redial()


@attrs.define
class _CandidateState:
    candidate: Candidate
    attempts: int = 0
    last: BaseException | None = None
    redial: reuse.Redial | None = attrs.field(
        default=attrs.Factory(lambda self: _redial_for(self.candidate), takes_self=True)
    )
    """A refused attempt's socket, for the next attempt (see :func:`_redial_for`)."""
    dropping: bool = False
    """Whether our listener drops this candidate's SYNs (from its first dial till the race ends)."""
    in_flight: bool = False
    handshaking: bool = False
    """Connected, its handshake under way."""
    done: bool = False
    prime: bool = False
    """The next attempt sends a priming SYN (:func:`punch.reuse.prime`): the last was
    refused by an RST."""
    starts: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=MAX_ATTEMPTS_PER_SECOND)
    )
    """When the latest :data:`MAX_ATTEMPTS_PER_SECOND` attempts started (trio time)."""

    def failure(self) -> CandidateFailed:
        last = self.last
        if self.handshaking:
            last = TimeoutError(
                f"attempt {self.attempts} connected, its handshake unfinished at the deadline"
            )
        elif self.in_flight or last is None:
            detail = f"attempt {self.attempts} unanswered at the deadline"
            if last is not None:
                detail += f" (before it: {_describe(last)})"
            last = TimeoutError(detail)
        return CandidateFailed(self.candidate, self.attempts, last)


@attrs.define(eq=False)
class Race:
    """One punch attempt: everything between an introduction and a kept stream.

    Args:
        introduction: what the rendezvous sent us (role, secret, candidates).
        local: the endpoint our listener holds; every dial of its family binds to it.
        inbound: accepted connections for this attempt (from :class:`InboundRouter`).
        own: our other endpoints (chosen local, host candidates, server-reflexive):
            never dialled.
        options: :class:`PunchOptions` (timeout, pacing, stagger).
        dial: the connect function (:func:`punch.reuse.dial`; tests swap it).
        prime: the priming function (:func:`punch.reuse.prime`; tests swap it),
            the attempt after one refused by an RST (see :data:`MIN_PACING`).
        tls: with encryption, gives our TLS context (client as the initiator,
            server as the responder), called as each stream comes up (the
            host built it as it opened, :meth:`~punch.Identity.prepare_tls`;
            the peer's certificate is added as a trust anchor): the
            initiator's ClientHello leaves with its Hello, the responder's
            server flight answers it at once (:mod:`punch._handshake`), and
            the kept stream's TLS goes on from there.
        other_locals: the endpoints we hold in the other family (a dual-stack
            host: one port number on IPv4 and on IPv6); candidates of a family
            we hold no port in are skipped.
        introduced_at: trio time (:func:`trio.current_time`, seconds) the
            introduction arrived; the deadline and every time on the outcome
            (:attr:`PeerStream.connect_time`, each :class:`Attempt`) count from
            it. Default: when :meth:`run` starts.
        router: the :class:`InboundRouter` whose listener feeds ``inbound``; from
            our first dial of a candidate (not an IPv4 host one) until the race
            ends, its SYNs are dropped there (:meth:`InboundRouter.drop_syns_from`),
            so that only our dials, a refused one's next with the same sequence
            numbers, answer them (see :data:`MIN_PACING`).
        own_nat: what we measured of our NAT (:attr:`punch.Host.nat`); with the
            introduction's ``peer_nat`` it decides a birthday punch
            (:func:`punch._birthday.side`: probes beside the candidates) or
            that no direct path exists (:func:`punch._birthday.no_direct_path`:
            host candidates only, for :data:`NO_PATH_TIMEOUT` s).
        prime_first: every candidate we would keep a refused socket for
            (:func:`_redial_for`) starts with a priming SYN
            (:func:`punch.reuse.prime`), and its first real attempt follows
            :data:`MIN_PACING` later from the same socket: a punch on 4-tuples
            that an earlier punch left in our NAT (an upgrade of a relayed
            stream, :meth:`punch.Host.upgrade`). That punch left our NAT
            tracking SYNs of sockets that are gone (conntrack SYN_SENT, 120 s);
            a peer's SYN that meets such an entry before our first new SYN
            turns it SYN_SENT2, bound to the dead socket's sequence numbers,
            and our new SYNs are out of its window (INVALID): in the netns lab
            (``python -m netns.upgrade``) 7 moves in 10 came through without
            this. A priming SYN re-initialises the entry with a live socket's
            sequence (as any SYN does while the entry is SYN_SENT) and dies
            before the peer's NAT; both sides prime at their introduction, so
            each entry is fresh before the other's real SYN can reach it,
            unless the two introductions arrive more than 50 ms plus a one-way
            delay apart.
    """

    introduction: Introduction
    local: Endpoint
    inbound: trio.MemoryReceiveChannel[Inbound]
    own: frozenset[Endpoint] = frozenset()
    options: PunchOptions = attrs.field(factory=PunchOptions)
    dial: DialFn = reuse.dial
    prime: PrimeFn = reuse.prime
    tls: Callable[[], ssl.SSLContext] | None = None
    other_locals: tuple[Endpoint, ...] = ()
    router: InboundRouter | None = None
    introduced_at: float | None = None
    own_nat: NatFacts | None = None
    prime_first: bool = False
    _ipv4_go: trio.Event = attrs.field(factory=trio.Event, init=False)
    _streams: set[trio.SocketStream] = attrs.field(factory=set, init=False)
    _states: list[_CandidateState] = attrs.field(factory=list, init=False)
    _inbound_errors: list[BaseException] = attrs.field(factory=list, init=False)
    _attempts: list[Attempt] = attrs.field(factory=list, init=False)
    _nominating: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _winner: PeerStream | None = attrs.field(default=None, init=False)
    _started: float = attrs.field(default=0.0, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _deadline: trio.CancelScope | None = attrs.field(default=None, init=False)
    _waiting_for_nomination: int = attrs.field(default=0, init=False)
    _prober: _birthday.Prober | None = attrs.field(default=None, init=False)
    _scanning: Endpoint | None = attrs.field(default=None, init=False)
    _relay_state: _CandidateState | None = attrs.field(default=None, init=False)

    @property
    def _label(self) -> str:
        i = self.introduction
        return f"punch {i.attempt_id.hex()[:8]} ({i.role.value}) to {i.peer_name!r}"

    async def run(self) -> PeerStream:
        """Race until a stream is nominated or the deadline passes.

        Returns:
            the kept :class:`PeerStream`; every other stream is closed.

        Raises:
            SelfDialError: every candidate is one of our own endpoints.
            PunchFailed: nothing won within ``timeout`` seconds; ``__cause__`` is
                an ``ExceptionGroup`` of :class:`CandidateFailed` (one per
                candidate) and :class:`HandshakeError` (one per failed inbound).
        """
        at = self.introduced_at
        self._started = trio.current_time() if at is None else at
        intro = self.introduction
        locals = (self.local, *self.other_locals)
        selection = select_candidates(intro.candidates, locals, self.own, intro.peer_name)
        grant = intro.relay if self.options.relay is not RelayMode.NEVER else None
        only = self.options.relay is RelayMode.ONLY
        if only and grant is None:
            raise PunchFailed(
                f"punch to {intro.peer_name!r}: relay 'only', but the rendezvous offered no "
                "relay (punch-rendezvous --relay)"
            )
        if only:
            selection = Selection(
                (), selection.skipped + tuple(Skipped(c, RELAY_ONLY) for c in selection.dial)
            )
        srflx = _srflx_v4(selection.dial)
        side = _birthday.side(self.own_nat, intro.peer_nat) if srflx is not None else None
        no_path = _birthday.no_direct_path(self.own_nat, intro.peer_nat)
        if no_path or side is not None:
            selection = _without_srflx_v4(selection, NO_PATH if no_path else BIRTHDAY_INSTEAD)
        for skip in selection.skipped:
            log.info("%s: skip %s: %s", self._label, skip.candidate, skip.reason)
        dial = (*selection.dial, *self._predicted(selection.dial))
        self._states = [_CandidateState(c) for c in dial]
        for state in self._states:
            state.prime = self.prime_first and state.redial is not None
        if side is not None and srflx is not None:
            self._prober = self._birthday_prober(side, srflx)
        no_path &= not self._ipv6_states()
        relay_at = self._started
        if grant is not None:
            self._relay_state = _CandidateState(
                Candidate(CandidateType.RELAYED, grant.endpoint), redial=None
            )
            relay_at += 0.0 if no_path or only else grant.delay
        log.info(
            "%s: racing accept on %s against %d candidate(s): %s",
            self._label,
            ", ".join(map(str, locals)),
            len(self._states),
            ", ".join(f"{s.candidate} ({s.candidate.endpoint.family_name})" for s in self._states)
            or "none",
        )
        if grant is not None:
            log.info(
                "%s: the relay at %s in %.3g s",
                self._label,
                grant.endpoint,
                relay_at - self._started,
            )
        keep = None
        timeout = self.options.timeout
        if no_path and grant is None:
            timeout = min(timeout, NO_PATH_TIMEOUT)
        try:
            with trio.move_on_at(self._started + timeout) as self._deadline:
                async with trio.open_nursery() as nursery:
                    self._scope = nursery.cancel_scope
                    for index, state in enumerate(self._states):
                        nursery.start_soon(self._dial_loop, state, index)
                    if self._relay_state is not None and grant is not None:
                        nursery.start_soon(self._relay_path, self._relay_state, grant, relay_at)
                    if only:  # a relayed stream only: the peer's direct ones are refused
                        nursery.start_soon(self._refuse_inbound)
                    else:
                        nursery.start_soon(self._accept_loop, nursery)
                    if self._prober is not None:
                        nursery.start_soon(self._probe_loop, self._prober)
                    if self._ipv6_states():
                        nursery.start_soon(self._stagger)
                    else:  # no task and no checkpoint between the start and the SYNs
                        self._ipv4_go.set()
            # only now is the winner ours to return: cancelled from outside, even a
            # nominated stream is closed with the rest, never leaked
            keep = self._winner.socket_stream if self._winner is not None else None
        finally:
            for stream in self._streams:
                if stream is not keep:
                    reuse.abort(stream.socket)
            self._streams.clear()
            for state in self._states:
                if state.redial is not None:
                    state.redial.close()
                if state.dropping and self.router is not None:
                    self.router.stop_dropping_syns_from(state.candidate.endpoint)
            if self._scanning is not None and self.router is not None:
                self.router.stop_dropping_syns_from(self._scanning)
        probes = self._prober.report() if self._prober is not None else None
        if self._winner is not None:
            self._winner.attempts = tuple(self._attempts)
            self._winner.probes = probes
            return self._winner
        relayed = [self._relay_state] if self._relay_state is not None else []
        errors: list[Exception] = [s.failure() for s in (*self._states, *relayed)] + [
            e for e in self._inbound_errors if isinstance(e, Exception)
        ]
        for error in errors:
            log.info("%s: failed: %s", self._label, error)
        summary = "; ".join(str(e) for e in errors) or "no candidates and no inbound connection"
        if probes is not None:
            summary += f"; birthday {probes.side}: {probes.sent} probes, none matched"
        summary += "".join(
            f"; {s.candidate}: not dialled: {s.reason}"
            for s in selection.skipped
            if s.reason in (NO_PATH, BIRTHDAY_INSTEAD, RELAY_ONLY)
        )
        group = ExceptionGroup(
            f"every path to {intro.peer_name!r} failed", errors or [TimeoutError()]
        )
        outcomes = {a.outcome for a in self._attempts}
        inbound_failed = any(
            isinstance(e.__cause__, HandshakeError)
            and not isinstance(e.__cause__, HandshakeInterrupted)
            for e in self._inbound_errors
        )
        raise PunchFailed(
            f"punch to {intro.peer_name!r} failed within {timeout:g} s: {summary}",
            attempts=tuple(self._attempts),
            authentication_failed=Outcome.HANDSHAKE_FAILED in outcomes or inbound_failed,
            probes=probes,
        ) from group

    def _birthday_prober(self, chosen: _birthday.Side, srflx: Endpoint) -> _birthday.Prober:
        """The probes of a birthday punch (:mod:`punch._birthday`) toward the peer's
        IPv4 server-reflexive endpoint, paced to leave room for the candidates'
        SYNs (:func:`punch._birthday.probe_rate`)."""
        local = next(e for e in (self.local, *self.other_locals) if e.family == srflx.family)
        log.info(
            "%s: birthday punch (%s; ours: %s; theirs: %s): %s",
            self._label,
            chosen.value,
            self.own_nat or "not measured",
            self.introduction.peer_nat or "not reported",
            f"from new ports to {srflx}"
            if chosen is _birthday.Side.SPRAY
            else f"from {local} to random ports at {srflx.ip}",
        )
        rate = _birthday.probe_rate(len(self._states), MAX_ATTEMPTS_PER_SECOND)
        return _birthday.Prober(chosen, local, srflx, self.dial, frozenset(self.own), rate)

    async def _probe_loop(self, prober: _birthday.Prober) -> None:
        """Run the birthday probes once IPv4 may go; a scan's peer address is
        dropped at our listener meanwhile (see :mod:`punch._birthday`)."""
        await self._ipv4_go.wait()
        if prober.side is _birthday.Side.SCAN and self.router is not None:
            self._scanning = Endpoint(prober.target.ip, 0)
            self.router.drop_syns_from(self._scanning)
        await prober.run(self._probe_connected)

    async def _probe_connected(
        self, stream: trio.SocketStream, candidate: Candidate, started: float
    ) -> None:
        """Authenticate a probe's stream (that started at ``started``, trio time) like a
        candidate's; recorded as an attempt."""
        self._streams.add(stream)
        assert self._prober is not None
        log.info(
            "%s: birthday %s probe connected to %s from %s (%d probes so far)",
            self._label,
            self._prober.side.value,
            candidate,
            Endpoint.from_sockaddr(stream.socket.getsockname()),
            self._prober.sent,
        )
        outcome: Outcome | BaseException | None = None
        try:
            await self._authenticate(ExactReader(stream), WonBy.CONNECT, _peer(stream), None)
            outcome = self._authenticated(stream)
        except OSError as exc:
            outcome = exc
            self._drop(stream)
            log.info("%s: %s: handshake failed: %s", self._label, candidate, exc)
        finally:
            self._record(_CandidateState(candidate, attempts=1), started, outcome, probe=True)

    async def _relay_path(self, state: _CandidateState, grant: RelayGrant, at: float) -> None:
        """At ``at`` (trio time), dial the relay from a new port, bind to the attempt
        (:func:`punch._relay.bind`), and run the handshake over it like any stream:
        one attempt, recorded like a candidate's."""
        await trio.sleep_until(at)
        started = trio.current_time()
        state.attempts, state.in_flight = 1, True
        local = self._local_for(state.candidate)
        log.info("%s: dialling the relay at %s", self._label, grant.endpoint)
        outcome: Outcome | BaseException | None = None
        try:
            try:
                stream = await self.dial(local, grant.endpoint, self.own, redial=None, shared=False)
            except OSError as exc:
                outcome = exc
                self._failed_attempt(state, exc)
                return
            finally:
                state.in_flight = False
            self._streams.add(stream)
            state.handshaking = True
            try:
                rest = await _relay.bind(stream, grant, self.introduction.role)
                log.info("%s: bound at the relay %s", self._label, grant.endpoint)
                reader = ExactReader(stream, bytearray(rest))
                await self._authenticate(reader, WonBy.CONNECT, grant.endpoint, None, relayed=True)
                outcome = self._authenticated(stream)
            except OSError as exc:
                outcome = exc
                self._drop(stream)
                self._failed_attempt(state, exc)
            finally:
                state.handshaking = False
        finally:
            self._record(state, started, outcome)

    def _predicted(self, dial: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        """The ports the peer's NAT will give next, when it reported sequential,
        endpoint-dependent allocation (:func:`punch._nat.predict`); dialled
        beside the rest, from the same port, past the selection's cap."""
        srflx = _srflx_v4(dial)
        if srflx is None:
            return ()
        taken = {c.endpoint for c in dial} | set(self.own)
        predicted = tuple(
            c for c in predict(self.introduction.peer_nat, srflx) if c.endpoint not in taken
        )
        if predicted:
            log.info(
                "%s: its NAT gives ports in sequence (%s): predicting %d, %s to %s",
                self._label,
                self.introduction.peer_nat,
                len(predicted),
                predicted[0].endpoint,
                predicted[-1].endpoint.port,
            )
        return predicted

    def _ipv6_states(self) -> list[_CandidateState]:
        return [s for s in self._states if s.candidate.endpoint.family == socket.AF_INET6]

    async def _stagger(self) -> None:
        """Let the IPv4 candidates go :attr:`PunchOptions.stagger` seconds in (run only
        when an IPv6 candidate is dialled; else they go at once: RFC 8305 §5)."""
        await trio.sleep(self.options.stagger)
        self._ipv4_go.set()

    def _ipv6_failed(self) -> None:
        """Every IPv6 candidate has failed an attempt: IPv4 need not wait (RFC 8305 §5).
        An ``EADDRNOTAVAIL`` is no failure here: the peer's connection on that path
        holds the 4-tuple, so the path works, and IPv4 keeps to the stagger (on
        loopback, IPv4 dialled at once authenticated first in 1 of about 60 runs)."""
        if all(s.last is not None for s in self._ipv6_states()):
            self._ipv4_go.set()

    def _local_for(self, candidate: Candidate) -> Endpoint:
        family = candidate.endpoint.family
        return next(e for e in (self.local, *self.other_locals) if e.family == family)

    async def _dial_loop(self, state: _CandidateState, index: int) -> None:
        """Dial one candidate, paced, until the race ends or the candidate is ruled out.

        ``index``: its place in the selection. Trio runs a batch of new tasks in
        either order, and a dial runs without a checkpoint up to its SYN (an
        unreachable one on to its failure), so every candidate but the first
        lets one batch go by, and the first candidate's SYN leaves first (IPv6
        first, then the introduction's order: server-reflexive first): behind a
        failing host candidate's dial, it left up to 0.5 ms late.
        """
        if index:
            await trio.lowlevel.checkpoint()
        local = self._local_for(state.candidate)
        if state.candidate.endpoint.family == socket.AF_INET and not self._ipv4_go.is_set():
            await self._ipv4_go.wait()
        if state.redial is not None and self.router is not None:
            # from our first dial on, only our dials answer its SYNs (see MIN_PACING)
            state.dropping = True
            self.router.drop_syns_from(state.candidate.endpoint)
        next_start = trio.current_time()
        while not state.done:
            if state.attempts:  # the first dial goes at once (the dial checkpoints)
                if len(state.starts) == MAX_ATTEMPTS_PER_SECOND:  # RFC 8445 §14: a rate
                    # (a microsecond over, so that no rounding of the times counts 21)
                    next_start = max(next_start, state.starts[0] + 1.000001)
                await trio.sleep_until(next_start)
            started = trio.current_time()
            state.starts.append(started)
            next_start = started + self.options.pacing
            state.attempts += 1
            state.in_flight = True
            log.debug(
                "%s: attempt %d to %s",
                self._label,
                state.attempts,
                state.candidate,
                extra={"fields": {"candidate": str(state.candidate), "attempt": state.attempts}},
            )
            outcome: Outcome | BaseException | None = None
            try:
                if state.prime:
                    state.in_flight = state.prime = False
                    outcome = self._prime(state, local)
                    next_start = started + MIN_PACING
                    continue
                stream = await self._attempt(state, local)
                state.in_flight = False
                if stream is None:
                    outcome = state.last
                    code = getattr(state.last, "errno", None)
                    if code != errno.EADDRNOTAVAIL:
                        # (the 4-tuple is held by the peer's own connection on this
                        # very path, accepted and handshaking: no failure of it)
                        self._ipv6_failed()
                    if code in REFUSALS:
                        next_start = started + MIN_PACING
                    # an RST (an ICMP refusal's socket is kept): prime the next time
                    kept = state.redial.kept if state.redial is not None else True
                    quick = trio.current_time() - started < PRIME_BELOW
                    if code == errno.ECONNREFUSED and not kept and quick:
                        state.prime = True  # an RST: prime at once (see MIN_PACING)
                        next_start = trio.current_time()
                    continue
                self._streams.add(stream)
                log.info("%s: connected to %s from %s", self._label, state.candidate, local)
                state.handshaking = True
                try:
                    await self._authenticate(
                        ExactReader(stream), WonBy.CONNECT, _peer(stream), None
                    )
                    state.handshaking = False
                    outcome = self._authenticated(stream)
                    return
                except OSError as exc:
                    state.handshaking = False
                    outcome = exc
                    self._drop(stream)
                    state.last = exc
                    # A host that answers but cannot prove the secret (a stray host on an
                    # overlapping private subnet) will not prove it on a second try; a
                    # connection that merely broke may work on the next.
                    state.done = isinstance(exc, HandshakeError) and not isinstance(
                        exc, HandshakeInterrupted
                    )
                    log.info("%s: %s: handshake failed: %s", self._label, state.candidate, exc)
            finally:
                self._record(state, started, outcome)

    def _record(
        self,
        state: _CandidateState,
        started: float,
        outcome: Outcome | BaseException | None,
        probe: bool = False,
    ) -> None:
        """Keep the attempt that started at ``started`` (trio time) as an :class:`Attempt`.

        ``outcome`` is None when the attempt was still under way as the race
        ended: cancelled if another path won, else unanswered at the deadline, or
        unfinished if it had connected and was mid-handshake.
        """
        if outcome is None and self._winner is not None:
            outcome = Outcome.CANCELLED
        elif outcome is None:
            outcome = Outcome.HANDSHAKE_UNFINISHED if state.handshaking else Outcome.NO_ANSWER
        begin, end = started - self._started, trio.current_time() - self._started
        if isinstance(outcome, BaseException):
            attempt = Attempt.failed(state.candidate, state.attempts, begin, end, outcome)
        else:
            attempt = Attempt(state.candidate, state.attempts, begin, end, outcome)
        self._attempts.append(attrs.evolve(attempt, probe=probe))

    def _prime(self, state: _CandidateState, local: Endpoint) -> Outcome | OSError:
        """Send a priming SYN to the candidate (:func:`punch.reuse.prime`); the next
        attempt connects the same socket."""
        assert state.redial is not None
        try:
            self.prime(local, state.candidate.endpoint, state.redial, self.own)
        except OSError as exc:
            self._failed_attempt(state, exc)
            return exc
        log.debug("%s: primed our NAT for %s", self._label, state.candidate)
        return Outcome.PRIMED

    async def _attempt(self, state: _CandidateState, local: Endpoint) -> trio.SocketStream | None:
        """One connect attempt from ``local``; None if it failed (the reason goes in ``state``)."""
        after_refusal = isinstance(state.last, ConnectionRefusedError)
        with trio.move_on_after(STUCK_AFTER_REFUSAL if after_refusal else math.inf):
            try:
                return await self.dial(
                    local, state.candidate.endpoint, self.own, redial=state.redial
                )
            except SelfDialError as exc:
                state.done = True
                self._failed_attempt(state, exc)
            except OSError as exc:
                self._failed_attempt(state, exc)
            return None
        stuck = TimeoutError(f"no answer within {STUCK_AFTER_REFUSAL:g} s after a refusal")
        self._failed_attempt(state, stuck)
        return None

    def _failed_attempt(self, state: _CandidateState, error: OSError) -> None:
        """Record why an attempt failed: at INFO when the outcome changed, else DEBUG.

        So ``-v`` tells each candidate's story (refused, then timed out, ...)
        in a few lines however many attempts the pacing makes.
        """
        changed = _kind(error) != _kind(state.last)
        state.last = error
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "%s: attempt %d to %s: %s",
            self._label,
            state.attempts,
            state.candidate,
            _describe(error),
            extra={
                "fields": {
                    "candidate": str(state.candidate),
                    "attempt": state.attempts,
                    "outcome": _describe(error),
                }
            },
        )

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        async for inbound in self.inbound:
            self._streams.add(inbound.reader.stream)
            log.info("%s: accepted a connection from %s", self._label, inbound.remote)
            nursery.start_soon(self._authenticate_inbound, inbound)

    async def _refuse_inbound(self) -> None:
        """Relay ``only``: close each stream the peer's direct dials make, unread."""
        async for inbound in self.inbound:
            log.info("%s: relay only: refusing %s", self._label, inbound.remote)
            reuse.abort(inbound.reader.stream.socket)

    async def _authenticate_inbound(self, inbound: Inbound) -> None:
        try:
            await self._authenticate(
                inbound.reader, WonBy.ACCEPT, inbound.remote, inbound.raw_hello
            )
        except OSError as exc:
            self._drop(inbound.reader.stream)
            failure = HandshakeError(f"inbound from {inbound.remote}: {exc}")
            failure.__cause__ = exc
            if len(self._inbound_errors) < MAX_REPORTED_INBOUND:
                self._inbound_errors.append(failure)
            log.info("%s: %s", self._label, failure)

    def _authenticated(self, stream: trio.SocketStream) -> Outcome:
        """The outcome of an attempt whose ``stream`` passed the handshake."""
        won = self._winner is not None and self._winner.socket_stream is stream
        return Outcome.NOMINATED if won else Outcome.AUTHENTICATED

    def _drop(self, stream: trio.SocketStream) -> None:
        self._streams.discard(stream)
        reuse.abort(stream.socket)

    async def _authenticate(
        self,
        reader: ExactReader,
        won_by: WonBy,
        remote: Endpoint,
        peer_hello: bytes | None,
        *,
        relayed: bool = False,
    ) -> None:
        """Run the :class:`Handshake` on one stream; the initiator nominates, the responder waits.

        ``peer_hello``: the Hello the router already read from an accepted stream.
        ``relayed``: the stream goes through the relay (:attr:`PeerStream.path`).
        """
        intro = self.introduction
        shake = Handshake(intro.role, intro.attempt_id, intro.secret, encrypt=self.options.encrypt)
        # the initiator's ClientHello leaves with its Hello (about 0.1 ms of CPU)
        started = self._start_tls(reader.stream) if intro.role is Role.INITIATOR else None
        tls, client_hello = started or (None, b"")
        await reader.send(shake.opening(client_hello))
        if peer_hello is not None:
            shake.receive(peer_hello)
        waiting = False
        try:
            while shake.expecting:
                if shake.stage is Stage.NOMINATION and not waiting:  # once, as it begins
                    waiting = True
                    self._awaiting_nomination(+1)
                    if shake.client_hello:  # the responder answers it at once
                        started = self._start_tls(reader.stream, shake.client_hello)
                        if started is not None:
                            tls, server_flight = started
                            await reader.send(server_flight)
                shake.receive(await reader.exactly(shake.expecting))
        finally:
            if waiting:
                self._awaiting_nomination(-1)
        log.info("%s: authenticated %s (won by %s)", self._label, remote, won_by.value)
        if intro.role is Role.INITIATOR:
            async with self._nominating:  # exactly one stream is ever nominated
                if self._winner is not None:
                    return
                await reader.send(shake.nominate())
                self._win(reader, won_by, remote, tls, relayed)
        else:  # the loop above ended on a valid Nomination
            if self._winner is not None:
                raise HandshakeError("a second nomination after one was accepted")
            if tls is None and shake.client_hello:  # TLS after the race reads it again
                reader.buffer[:0] = shake.client_hello
            self._win(reader, won_by, remote, tls, relayed)

    def _start_tls(
        self, stream: trio.SocketStream, client_hello: bytes = b""
    ) -> tuple[TLSStream, bytes] | None:
        """Our TLS on a stream we may keep, and its first flight: the initiator's
        ClientHello, or the responder's answer to ``client_hello``. None when
        plaintext, or when OpenSSL cannot load our certificate or refuses the
        ClientHello: TLS after the race then fails with its typed error. A stream
        that is not nominated drops it."""
        if self.tls is None:
            return None
        server_side = self.introduction.role is Role.RESPONDER
        try:
            tls = TLSStream(stream, self.tls(), server_side=server_side, pending=client_hello)
            return tls, tls.flight()
        except (ssl.SSLError, ValueError, trio.BrokenResourceError) as exc:
            log.info("%s: no TLS during the handshake: %s", self._label, exc.__cause__ or exc)
            return None

    def _awaiting_nomination(self, change: int) -> None:
        """Responder: count the streams that lack only the Nomination; while any does,
        the race's deadline is ``timeout`` + :data:`NOMINATION_GRACE`, else ``timeout``.

        The initiator nominates without waiting for an answer; under loss its
        Nomination arrives a retransmission timeout later, and a responder that
        gave up at its deadline would reset a stream the initiator already uses.
        """
        assert self._deadline is not None
        self._waiting_for_nomination += change
        deadline = self._started + self.options.timeout
        if self._waiting_for_nomination:
            deadline += NOMINATION_GRACE
        self._deadline.deadline = deadline

    def _peer_stream(
        self,
        reader: ExactReader,
        won_by: WonBy,
        remote: Endpoint,
        tls: TLSStream | None,
        relayed: bool,
    ) -> PeerStream:
        stream = reader.stream  # its retransmissions stay capped: see PeerStream.receive_some
        if tls is not None:
            tls.feed(bytes(reader.buffer))  # read past the handshake: TLS's
            reader.buffer.clear()
        return PeerStream(
            socket_stream=stream,
            peer_name=self.introduction.peer_name,
            role=self.introduction.role,
            local=Endpoint.from_sockaddr(stream.socket.getsockname()),
            remote=remote,
            won_by=won_by,
            attempt_id=self.introduction.attempt_id,
            connect_time=trio.current_time() - self._started,
            pending=reader.buffer,
            started_tls=tls,
            path=StreamPath.RELAYED if relayed else StreamPath.DIRECT,
        )

    def _win(
        self,
        reader: ExactReader,
        won_by: WonBy,
        remote: Endpoint,
        tls: TLSStream | None = None,
        relayed: bool = False,
    ) -> None:
        """Keep this stream (``tls``: its TLS, started) and cancel every other path."""
        if self._winner is None:
            self._winner = self._peer_stream(reader, won_by, remote, tls, relayed)
        log.info(
            "%s: nominated %s -> %s (%s, won by %s) after %.1f ms",
            self._label,
            self._winner.local,
            remote,
            self._winner.path.value,
            won_by.value,
            self._winner.connect_time * 1000,
        )
        assert self._scope is not None
        self._scope.cancel()
