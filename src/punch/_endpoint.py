"""Values: endpoints, candidates and roles (RFC 8445 §5.1.1 terms)."""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
from typing import Any

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> IPAddress:
    """``ipaddress.ip_address``, memoised: every dial and accept builds endpoints."""
    return ipaddress.ip_address(text)


def _check_ip(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"ip must be str, not {value!r}")
    try:
        _parse(value)
    except ValueError:
        raise ValueError(f"ip must be an IPv4 or IPv6 address, not {value!r}") from None


def _check_port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"port must be int, not {value!r}")
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be in 0..65535, not {value!r}")


def _normalise_ip(value: str) -> str:
    """``str(ip_address(value))`` when it parses, an IPv4-mapped IPv6 address as the
    IPv4 one (RFC 4291 §2.5.5.2); else ``value``, for the validator to refuse."""
    if isinstance(value, str):
        try:
            address = _parse(value)
        except ValueError:
            return value
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    return value


@attrs.frozen(order=True)
class Endpoint:
    """A transport address: an IP address and a TCP port.

    Args:
        ip: an IPv4 or IPv6 address in text form (no brackets, no host names);
            it is normalised, so ``"::0001"`` and ``"::1"`` compare equal, and an
            IPv4-mapped IPv6 address (``"::ffff:192.0.2.7"``, what a dual-stack
            socket reports for an IPv4 peer, RFC 4291 §2.5.5.2) is its IPv4
            address: limits, candidates and logs treat it as IPv4.
        port: 0..65535 (0 means "any" when binding).

    Raises:
        TypeError: ``ip`` is not a ``str`` or ``port`` not an ``int``.
        ValueError: ``ip`` is not an address or ``port`` is out of range.
    """

    ip: str = attrs.field(converter=_normalise_ip, validator=_check_ip)
    port: int = attrs.field(validator=_check_port)

    @property
    def address(self) -> IPAddress:
        """The IP address as an :mod:`ipaddress` object."""
        return _parse(self.ip)

    @property
    def family(self) -> socket.AddressFamily:
        """``AF_INET`` or ``AF_INET6``."""
        return socket.AF_INET6 if self.address.version == 6 else socket.AF_INET

    @property
    def family_name(self) -> str:
        """``"IPv4"`` or ``"IPv6"``, for logs."""
        return "IPv6" if self.address.version == 6 else "IPv4"

    def sockaddr(self) -> tuple[str, int]:
        """The address in the form ``socket.bind``/``connect`` take."""
        return (self.ip, self.port)

    @classmethod
    def from_sockaddr(cls, sockaddr: Any) -> Endpoint:
        """Build from what ``getsockname()``/``getpeername()`` return (v4 or v6)."""
        return cls(sockaddr[0], sockaddr[1])

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``"IP:PORT"`` or ``"[IPv6]:PORT"``.

        Raises:
            ValueError: the text is not of that form.
        """
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected IP:PORT or [IPv6]:PORT, not {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def as_endpoint(value: Endpoint | tuple[str, int] | str, what: str) -> Endpoint:
    """Accept an :class:`Endpoint`, an ``(ip, port)`` tuple or ``"ip:port"`` text.

    Args:
        value: the endpoint in any of those forms.
        what: the argument's name, for error messages.

    Raises:
        TypeError: another type.
        ValueError: not an IP address and port.
    """
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, str):
        return Endpoint.parse(value)
    if isinstance(value, tuple) and len(value) == 2:
        return Endpoint(value[0], value[1])
    raise TypeError(f"{what} must be an Endpoint, (ip, port) or 'ip:port', not {value!r}")


class CandidateType(enum.Enum):
    """Where a candidate address comes from (RFC 8445 §5.1.1)."""

    HOST = "host"
    """An address bound on the peer's own interface."""
    SERVER_REFLEXIVE = "srflx"
    """The peer's public mapping as the rendezvous server saw it."""
    PREDICTED = "predicted"
    """A port the peer's NAT is predicted to give its next mapping, from the
    sequential allocation it reported (:func:`punch._nat.predict`), or a random
    port a birthday punch's scan dials (:mod:`punch._birthday`); made by the
    dialling side, never sent by a rendezvous."""
    RELAYED = "relay"
    """A relay's endpoint (RFC 8445 §5.1.1.2; TURN's name is "relay"): the
    introduction's :class:`~punch._protocol.RelayGrant`, dialled from a new
    port; the relay splices the stream to the peer's (:mod:`punch._relay`)."""


@attrs.frozen(order=True)
class Candidate:
    """A transport address at which a peer may be reachable.

    Args:
        type: :class:`CandidateType`.
        endpoint: the :class:`Endpoint` to dial.
    """

    type: CandidateType = attrs.field(validator=attrs.validators.instance_of(CandidateType))
    endpoint: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))

    def __str__(self) -> str:
        return f"{self.type.value} {self.endpoint}"


class Role(enum.Enum):
    """Who does what in one punch attempt (RFC 8445 §6.1.1 controlling/controlled).

    The initiator is the peer that asked the rendezvous for the other; it
    nominates the connection both keep and is the "client" for anything
    layered on top (TLS, an application protocol).
    """

    INITIATOR = "initiator"
    RESPONDER = "responder"

    @property
    def other(self) -> Role:
        """The opposite role."""
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR
