"""Birthday punching: a direct path through a NAT that gives each new mapping a random port.

An endpoint-dependent NAT with random allocation (RFC 4787 §4.1; Linux's
``masquerade fully-random``) gives the peer behind it a new, unpredictable
public port for every destination, so the port the rendezvous saw is no use to
anyone else. The two sides then meet by chance, the birthday paradox (Tailscale,
"How NAT traversal works"; for TCP, the constraints below are ours):

- the side behind that NAT (:attr:`Side.SPRAY`) dials the peer's
  server-reflexive endpoint from new local ports, each through a new random
  public port of its NAT;
- the side behind an endpoint-independent NAT (:attr:`Side.SCAN`) dials random
  ports at that NAT's address from its one port, each SYN opening its own NAT
  for that port.

A spray SYN whose public port a live scan probe dialled meets that probe's
socket (the scanning side's NAT lets it in through the entry the probe's SYN
made), and the two make a TCP simultaneous open. Where the scanning side's NAT
drops unsolicited SYNs, a scan SYN that meets a live spray socket does the same
the other way; where it answers them with an RST or an ICMP error, each
unmatched spray SYN is refused at once, so only the first way counts. The
server-reflexive candidate itself is not dialled (a random NAT's mapping toward
the rendezvous is no one else's). Each pair of probes matches at 1 in 64,512
(the scan draws from :data:`PORTS`), so at ``r`` probes a second on each side,
each alive ``L`` s, matches come at ``r * r * L / 64,512`` a second, twice that
where the scanning side's NAT drops. With one host candidate beside them,
``r`` is 179 (:func:`probe_rate`) and ``L`` 0.9 s: 0.45 matches a second (a
median of 1.6 s, 1 punch in 80 without one by 10 s) or 0.9 (0.8 s). Measured
in the netns lab, 2026-12-02: see :data:`PROBE_LIFETIME`.

TCP's constraints, and how each is met:

- a probe is a socket, so one descriptor: a probe lives :data:`PROBE_LIFETIME`
  s, at most :data:`MAX_OPEN_PROBES` at once, each closed when it ends;
- the kernel retransmits a SYN after 1 s (RFC 6298 §2.1's initial timeout):
  a probe ends before that, so it costs exactly one SYN;
- every SYN a host sends in a punch counts against :data:`MAX_SYNS_PER_SECOND`,
  the candidates' at their most (:func:`probe_rate`);
- a probe closed in SYN_SENT leaves its NAT's entry open (120 s); a spray SYN
  that comes through it later would reach the scanning side's listener, whose
  SYN-ACK's fresh sequence numbers that entry does not track: the listener
  drops SYNs from the peer's address meanwhile
  (:meth:`punch._race.InboundRouter.drop_syns_from`).

Sans-IO decisions (:func:`side`, :func:`probe_rate`, :func:`scan_ports`) and
the probe loop (:class:`Prober`), which :class:`punch._race.Race` runs beside
its candidates.
"""

from __future__ import annotations

import collections
import enum
import random
import resource
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

import attrs
import trio

from . import reuse
from ._endpoint import Candidate, CandidateType, Endpoint
from ._nat import Allocation, Mapping, NatFacts
from ._outcome import Outcome, classify

MAX_SYNS_PER_SECOND = 200
"""SYNs one host's punch may send within any one second, every path together
(issue 16's cap): the probes get what the candidates' attempts, at their most,
leave (:func:`probe_rate`)."""
PROBE_LIFETIME = 0.9
"""Seconds a probe waits for its simultaneous open before it is closed: under
the kernel's 1 s initial retransmission timeout (RFC 6298 §2.1, Linux's
``TCP_TIMEOUT_INIT``), so a probe sends one SYN, never two; and well over
the 2 round trips a match takes (300 ms one way at most in the lab's sweeps)."""
MAX_OPEN_PROBES = 256
"""Probe sockets open at once, at most: :data:`MAX_SYNS_PER_SECOND` x
:data:`PROBE_LIFETIME` (180) need fewer; a quarter of ``RLIMIT_NOFILE``'s soft
limit if that is smaller (:func:`open_probe_limit`)."""
PORTS = range(1024, 65536)
"""The ports a random allocation draws from: Linux NAT's default range for
ports above 1023 (``nf_nat_l4proto_unique_tuple``), and the range RFC 6056
§3.2 tells ephemeral ports to use. A NAT with a narrower range loses nothing
but the probes outside it."""


class Side(enum.Enum):
    """What a host does in a birthday punch."""

    SPRAY = "spray"
    """Our NAT maps each destination to a random port: dial the peer's
    server-reflexive endpoint from new local ports."""
    SCAN = "scan"
    """The peer's NAT does: dial random ports at its address from our port."""


def _random_dependent(facts: NatFacts) -> bool:
    return facts.mapping is Mapping.ENDPOINT_DEPENDENT and facts.allocation is Allocation.RANDOM


def side(own: NatFacts | None, peer: NatFacts | None) -> Side | None:
    """Our part in a birthday punch, from both hosts' NAT facts; None when there is none.

    Args:
        own: what we measured of our NAT (:attr:`punch.Host.nat`), or None.
        peer: what the peer reported (its introduction's ``peer_nat``), or None.

    Returns:
        :attr:`Side.SPRAY` when our NAT maps endpoint-dependent with random
        ports and the peer's facts do not say endpoint-dependent (a peer that
        reported nothing may still scan, or be public: then the first probe
        reaches its listener); :attr:`Side.SCAN` when the peer's NAT is the
        random one and ours maps endpoint-independent (a host with no NAT
        passes None: the peer's probes reach its listener, which a scan would
        make drop them). None otherwise: neither NAT random and
        endpoint-dependent (the server-reflexive or predicted candidates
        work), or both endpoint-dependent (no direct path:
        :func:`no_direct_path`).
    """
    peer_dependent = peer is not None and peer.mapping is Mapping.ENDPOINT_DEPENDENT
    if own is not None and _random_dependent(own) and not peer_dependent:
        return Side.SPRAY
    if peer is not None and _random_dependent(peer):
        if own is not None and own.mapping is Mapping.ENDPOINT_INDEPENDENT:
            return Side.SCAN
    return None


def needs_own_facts(peer: NatFacts | None) -> bool:
    """Whether a race with this peer depends on our own NAT's facts: its NAT maps
    endpoint-dependent, so we scan, or tell that there is no direct path."""
    return peer is not None and peer.mapping is Mapping.ENDPOINT_DEPENDENT


def no_direct_path(own: NatFacts | None, peer: NatFacts | None) -> bool:
    """Whether both NATs map endpoint-dependent and at least one picks random ports.

    Then neither side's server-reflexive candidate, nor a predicted port, nor
    a birthday punch (both sides would need the other's random port) reaches
    the other; only a relay, or a host candidate on a shared LAN, can.
    """
    if own is None or peer is None:
        return False
    both = own.mapping is peer.mapping is Mapping.ENDPOINT_DEPENDENT
    return both and (_random_dependent(own) or _random_dependent(peer))


def failure_hint(own: NatFacts | None, peer: NatFacts | None, peer_name: str) -> str | None:
    """Why a punch between these NATs may have failed, in one clause; None if they
    should not stop one (RFC 4787 §4.1's mapping, as the probes at registration
    found it: ``punch natcheck`` tells the rest).

    Args:
        own: our NAT's facts (:attr:`punch.Host.nat`), or None.
        peer: the peer's (its introduction's ``peer_nat``), or None.
        peer_name: the peer's registered name.
    """
    named = [
        (whose, facts)
        for whose, facts in (("our", own), (f"{peer_name}'s", peer))
        if facts is not None and facts.mapping is Mapping.ENDPOINT_DEPENDENT
    ]
    if not named:
        return None
    if len(named) == 2:
        each = ", ".join(
            f"{'ours' if whose == 'our' else whose} with {f.allocation.value} ports"
            for whose, f in named
        )
        return (
            f"both NATs map each destination to a new port (endpoint-dependent mapping: {each}, "
            "as 'punch natcheck' shows): no direct path exists between them; a relay is needed"
        )
    ((whose, facts_one),) = named
    if facts_one.allocation is Allocation.RANDOM:
        how = (
            "the two sides probed for a matching pair of ports (birthday punching) and "
            "found none in time; another try may find one"
        )
    else:
        how = "the other side dialled its predicted next ports, and none was the one it took"
    return (
        f"{whose} NAT maps each destination to a new port (endpoint-dependent mapping, "
        f"{facts_one.allocation.value} ports, as 'punch natcheck' shows): {how}"
    )


def scan_ports(rng: random.Random, avoid: frozenset[int] = frozenset()) -> Iterator[int]:
    """Ports of :data:`PORTS` in random order, each once, none of ``avoid``."""
    drawn = set(avoid)
    while len(drawn) < len(PORTS):
        port = rng.choice(PORTS)
        if port not in drawn:
            drawn.add(port)
            yield port


def open_probe_limit() -> int:
    """Probe sockets that may be open at once: :data:`MAX_OPEN_PROBES`, or a quarter of
    this process's soft ``RLIMIT_NOFILE`` (getrlimit(2)) if smaller, at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_PROBES
    return max(1, min(MAX_OPEN_PROBES, soft // 4))


def probe_rate(candidates: int, per_candidate: int) -> int:
    """Probes a second beside ``candidates`` dialled candidates, each starting at most
    ``per_candidate`` attempts a second (:data:`punch._race.MAX_ATTEMPTS_PER_SECOND`)
    and the kernel retransmitting the SYN of one under way at most once a second
    (:func:`punch.reuse.cap_retransmission_timeout`): every SYN of the punch together
    stays within :data:`MAX_SYNS_PER_SECOND`. At least 1."""
    return max(1, MAX_SYNS_PER_SECOND - candidates * (per_candidate + 1))


@attrs.frozen
class ProbeReport:
    """What a birthday punch's probes came to, on :class:`~punch.PeerStream` and
    :class:`~punch.PunchFailed` (``probes``).

    Attributes:
        side: ``"spray"`` or ``"scan"`` (:class:`Side`).
        sent: probes dialled (one SYN each).
        outcomes: how many ended each way, by :class:`~punch.Outcome` value
            (``no-answer``: closed after :data:`PROBE_LIFETIME` s; ``cancelled``:
            under way as the punch ended), or ``connected``; they add up to ``sent``.
        peak_open: the most probe sockets open at once (descriptors).
        matched: the candidates whose probe connected, in order.
    """

    side: str
    sent: int
    outcomes: dict[str, int]
    peak_open: int
    matched: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """For ``punch --json``."""
        return attrs.asdict(self)


ProbeConnected = Callable[[trio.SocketStream, Candidate, float], Awaitable[None]]
"""What a :class:`Prober` calls with a probe's connected stream, its candidate and
when it started (trio time): authenticate it."""


class DialFn(Protocol):
    """The shape of :func:`punch.reuse.dial`, which tests swap for fakes."""

    def __call__(
        self,
        local: Endpoint,
        remote: Endpoint,
        own: Iterable[Endpoint],
        *,
        redial: reuse.Redial | None,
        shared: bool = True,
    ) -> Awaitable[trio.SocketStream]: ...


@attrs.define(eq=False)
class Prober:
    """The probes of one birthday punch: ``rate`` a second, evenly spaced, each
    alive :data:`PROBE_LIFETIME` s, at most :func:`open_probe_limit` open.

    Args:
        side: :class:`Side`.
        local: our endpoint: the shared port (scan), or our address (spray:
            port 0, a new port each, not shared, chosen by the kernel).
        target: the peer's server-reflexive endpoint (spray: dialled; scan:
            its address, at random ports).
        dial: :func:`punch.reuse.dial`'s shape.
        own: our endpoints, never dialled.
        rate: probes a second (:func:`probe_rate`).
        rng: the scan's port order.
    """

    side: Side
    local: Endpoint
    target: Endpoint
    dial: DialFn
    own: frozenset[Endpoint]
    rate: int
    rng: random.Random = attrs.field(factory=random.Random)
    sent: int = attrs.field(default=0, init=False)
    open: int = attrs.field(default=0, init=False)
    peak_open: int = attrs.field(default=0, init=False)
    outcomes: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    matched: list[Candidate] = attrs.field(factory=list, init=False)

    def report(self) -> ProbeReport:
        """The probes so far, as data."""
        return ProbeReport(
            self.side.value,
            self.sent,
            dict(self.outcomes),
            self.peak_open,
            tuple(map(str, self.matched)),
        )

    def _candidates(self) -> Iterator[tuple[Endpoint, Candidate]]:
        if self.side is Side.SPRAY:
            srflx = Candidate(CandidateType.SERVER_REFLEXIVE, self.target)
            while True:
                yield Endpoint(self.local.ip, 0), srflx
        for port in scan_ports(self.rng, frozenset({self.target.port})):
            yield self.local, Candidate(CandidateType.PREDICTED, Endpoint(self.target.ip, port))

    async def run(self, connected: ProbeConnected) -> None:
        """Probe until cancelled (or every port of a scan is done); never raises OSError."""
        slots = trio.Semaphore(open_probe_limit())
        starts: collections.deque[float] = collections.deque(maxlen=self.rate)
        next_start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for local, candidate in self._candidates():
                await slots.acquire()  # a probe ends within PROBE_LIFETIME
                if len(starts) == self.rate:  # never more than rate in a sliding second
                    next_start = max(next_start, starts[0] + 1.000001)
                await trio.sleep_until(next_start)
                # on an even grid: a start late by a scheduling delay (0.5 ms and
                # more, a tenth of the gap) does not push every later one back
                next_start += 1 / self.rate
                starts.append(trio.current_time())
                self.sent += 1
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
                nursery.start_soon(self._probe, local, candidate, connected, slots)

    async def _probe(
        self,
        local: Endpoint,
        candidate: Candidate,
        connected: ProbeConnected,
        slots: trio.Semaphore,
    ) -> None:
        stream, started = None, trio.current_time()
        outcome = Outcome.CANCELLED  # unless it ends before the punch does
        try:
            with trio.move_on_after(PROBE_LIFETIME):
                try:
                    stream = await self.dial(
                        local, candidate.endpoint, self.own, redial=None, shared=local.port != 0
                    )
                except OSError as exc:
                    outcome = classify(exc)
                    return
            outcome = Outcome.NO_ANSWER  # unless it connected
        finally:
            self.open -= 1
            slots.release()
            self.outcomes["connected" if stream is not None else outcome.value] += 1
        if stream is None:
            return
        self.matched.append(candidate)
        await connected(stream, candidate, started)
