"""RFC 4787's names for what a NAT does, and what a host tells the rendezvous of its own.

Sans-IO: :mod:`punch._natcheck` measures, :mod:`punch._protocol` carries
:class:`NatFacts`, the race will read them (issue 16).
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Sequence

import attrs

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
