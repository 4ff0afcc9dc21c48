"""RFC 4787's names for what a NAT does, and what a host tells the rendezvous of its own.

Sans-IO: :mod:`punch._natcheck` measures, :mod:`punch._protocol` carries
:class:`NatFacts`, the race reads them: :func:`predict` here for a sequential
NAT, :mod:`punch._birthday` for a random one.
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Sequence

import attrs

from ._endpoint import Candidate, CandidateType, Endpoint

MAX_SEQUENTIAL_STEP = 64
"""The largest step (in ports) still called sequential: a NAT that allocates
``+Δ`` with a bigger Δ is as good as random to a predictor with a small window."""


class Mapping(enum.Enum):
    """RFC 4787 §4.1, as two ports of one server address show it."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"


class Allocation(enum.Enum):
    """How the NAT picks the public port of a new mapping."""

    PRESERVING = "preserving"
    """The local port itself."""
    SEQUENTIAL = "sequential"
    """The previous mapping's port + Δ (:attr:`NatReport.step`)."""
    RANDOM = "random"
    """Neither."""


class Filtering(enum.Enum):
    """RFC 4787 §5, as one server address shows it."""

    ADDRESS_DEPENDENT = "endpoint-independent or address-dependent"
    """A SYN from a port we never spoke to came in (from an address we spoke to)."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """It was dropped, reset or answered with ICMP."""
    UNKNOWN = "unknown"
    """The server did not try (busy), or the answer did not arrive."""


def classify_allocation(
    local_ports: Sequence[int], mapped_ports: Sequence[int]
) -> tuple[Allocation, int | None]:
    """The allocation pattern of new mappings, and its step when sequential.

    Args:
        local_ports: each probe's local port, in the order they were opened.
        mapped_ports: the public port each got, in the same order (at least 2).

    Returns:
        ``(PRESERVING, 0)`` when every mapped port is its local port;
        ``(SEQUENTIAL, Δ)`` when the most common difference between
        consecutive mapped ports, Δ with 0 < |Δ| <= :data:`MAX_SEQUENTIAL_STEP`,
        is at least half of the differences (other traffic through the NAT
        takes ports in between: a second LAN host's connections);
        ``(RANDOM, None)`` otherwise.

    Raises:
        ValueError: the sequences differ in length or hold fewer than 2 ports.
    """
    if len(local_ports) != len(mapped_ports) or len(mapped_ports) < 2:
        raise ValueError("need the same number (>= 2) of local and mapped ports")
    if list(local_ports) == list(mapped_ports):
        return Allocation.PRESERVING, 0
    steps = [b - a for a, b in itertools.pairwise(mapped_ports)]
    step, count = collections.Counter(steps).most_common(1)[0]
    if 0 < abs(step) <= MAX_SEQUENTIAL_STEP and 2 * count >= len(steps):
        return Allocation.SEQUENTIAL, step
    return Allocation.RANDOM, None


MAX_FACT_PORTS = 8
"""Most public ports a :class:`NatFacts` lists."""


def _ports(_: object, attribute: attrs.Attribute[tuple[int, ...]], value: object) -> None:
    if not isinstance(value, tuple) or not 0 < len(value) <= MAX_FACT_PORTS:
        raise ValueError(f"{attribute.name} must be a tuple of 1-{MAX_FACT_PORTS} ports")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value):
        raise ValueError(f"{attribute.name} must hold ports 1-65535, not {value!r}")


def _step(_: object, __: object, value: int | None) -> None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_SEQUENTIAL_STEP
    ):
        raise ValueError(f"step must be None or |step| <= {MAX_SEQUENTIAL_STEP}, not {value!r}")


@attrs.frozen
class NatFacts:
    """What a host learnt of its NAT as it registered, for its peers' introductions.

    Args:
        mapping: :class:`Mapping`, from its port's endpoint as the control port
            and the probe port saw it.
        port_preserving: the control port saw its local port.
        allocation: :class:`Allocation` of its new mappings (``ports``).
        step: Δ when sequential, 0 when preserving, else None
            (|Δ| <= :data:`MAX_SEQUENTIAL_STEP`).
        ports: the public ports of its new mappings, oldest first, 1 to
            :data:`MAX_FACT_PORTS`: a predictor's starting point.
    """

    mapping: Mapping = attrs.field(validator=attrs.validators.instance_of(Mapping))
    port_preserving: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    allocation: Allocation = attrs.field(validator=attrs.validators.instance_of(Allocation))
    step: int | None = attrs.field(validator=_step)
    ports: tuple[int, ...] = attrs.field(validator=_ports)

    def __str__(self) -> str:
        step = f" {self.step:+d}" if self.allocation is Allocation.SEQUENTIAL else ""
        kind = "cone" if self.mapping is Mapping.ENDPOINT_INDEPENDENT else "symmetric"
        return f"{self.mapping.value} mapping ({kind}), {self.allocation.value}{step} ports"


PREDICTION_WINDOW = 16
"""Ports dialled ahead of a sequential NAT's last reported one (:func:`predict`).

Measured cost (lab, 2026-12-02): the predicting side's NAT holds one conntrack
entry per predicted port, left in SYN_SENT (120 s, nf_conntrack's default) once
the punch ends, since a socket closed in SYN_SENT sends nothing; the side with
the sequential NAT spends no more than a cone does. 16 descriptors more during
the punch, all closed when it ends.

The peer's first SYN takes the next port when nothing else went through its
NAT since its report; each new mapping in between (a retry after an RST, a
second LAN host's connection) moves it one step on. Each predicted port is
one socket in SYN_SENT, its SYN sent once and retransmitted by the kernel at
most each second (:func:`punch.reuse.cap_retransmission_timeout`): 16 SYNs
at the introduction, then at most 16 a second, under the 200 a second issue
16 allows a peer."""


CONTIGUOUS_STEP = 4
"""Steps up to this many ports are dialled as a contiguous run (:func:`predict`): a
step measured from two or three ports mixes the NAT's own step with the other
LAN hosts' connections in between. In the lab (``symmetric-seq``, a second LAN
host connecting 10 times a second in every other trial), predicting by the
reported step missed the peer's port in 5 of 120 trials, where a report said
step 2; as a contiguous run, 120 of 120 connected (2026-12-02)."""


def predict(
    facts: NatFacts | None, srflx: Endpoint, window: int = PREDICTION_WINDOW
) -> tuple[Candidate, ...]:
    """The ports a sequential, endpoint-dependent NAT will give its next mappings.

    Args:
        facts: what the peer reported of its NAT (its introduction's ``peer_nat``).
        srflx: the peer's server-reflexive candidate (its NAT's public address).
        window: how many ports ahead (>= 1).

    Returns:
        ``window`` :data:`~punch.CandidateType.PREDICTED` candidates at
        ``srflx``'s address, ``last + step``, ``last + 2 * step``... (ports
        outside 1..65535 left out), the step taken as ±1 up to
        :data:`CONTIGUOUS_STEP`; none unless ``facts`` say endpoint-dependent
        mapping with sequential allocation: an endpoint-independent NAT's
        server-reflexive candidate is its mapping, and a random one cannot be
        predicted.
    """
    if facts is None or facts.mapping is not Mapping.ENDPOINT_DEPENDENT:
        return ()
    if facts.allocation is not Allocation.SEQUENTIAL or not facts.step:
        return ()
    last, step = facts.ports[-1], facts.step
    if abs(step) <= CONTIGUOUS_STEP:  # every port on, in the step's direction
        step = 1 if step > 0 else -1
    ports = (last + step * i for i in range(1, window + 1))
    return tuple(
        Candidate(CandidateType.PREDICTED, Endpoint(srflx.ip, port))
        for port in ports
        if 0 < port < 65536
    )
