"""Our host candidates, and which of the peer's candidates a race dials (no sockets, no time)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import attrs
import psutil

from ._endpoint import Candidate, Endpoint, IPAddress
from ._errors import SelfDialError
from .reuse import check_not_self

MAX_DIALED_CANDIDATES = 8
"""Remote candidates dialled per introduction, in the order given (RFC 8445 §19: bounded checks)."""


@attrs.frozen
class Skipped:
    """A candidate not dialled, and why (one line)."""

    candidate: Candidate
    reason: str


@attrs.frozen
class Selection:
    """The candidates to dial, in the introduction's order, and those skipped."""

    dial: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]


_ULA = ipaddress.IPv6Network("fc00::/7")
_IPV6_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")


def _reachable_by_peers(address: IPAddress) -> bool:
    """Not loopback, link-local (it needs a zone), multicast, unspecified or site-local."""
    return not (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address in _IPV6_SITE_LOCAL
    )


def interface_addresses(family: socket.AddressFamily) -> tuple[IPAddress, ...]:
    """This machine's addresses of ``family`` that a peer could dial, best first.

    Read from the OS by psutil (``net_if_addrs``, getifaddrs(3)) on interfaces
    that are up. Left out: loopback, link-local (``169.254.0.0/16``,
    ``fe80::/10``: they need the interface's zone), multicast, unspecified and
    the deprecated IPv6 site-local ``fec0::/10``. IPv6 global addresses come
    before unique local ones (``fc00::/7``), RFC 6724 §2.1's precedence 40
    against 3; otherwise the OS's order.

    Args:
        family: ``socket.AF_INET`` or ``socket.AF_INET6``.

    Returns:
        the addresses, possibly none. Never raises: an OS that cannot list
        them gives none.
    """
    try:
        stats = psutil.net_if_stats()
        listed = psutil.net_if_addrs()
    except (OSError, RuntimeError):
        return ()
    found: list[IPAddress] = []
    for name, addresses in listed.items():
        if name in stats and not stats[name].isup:
            continue
        for entry in addresses:
            if entry.family != family:
                continue
            try:
                address = ipaddress.ip_address(entry.address.split("%", 1)[0])
            except ValueError:
                continue
            if _reachable_by_peers(address) and address not in found:
                found.append(address)
    return tuple(sorted(found, key=lambda a: a.version == 6 and a in _ULA))


def _ula_unreachable(candidate: Endpoint, own: Iterable[Endpoint]) -> bool:
    """A unique local candidate (``fc00::/7``) in no /48 of ours: not routed to us
    (RFC 4193 §1: a ULA /48 is one site's)."""
    address = candidate.address
    if address.version != 6 or address not in _ULA:
        return False
    site = ipaddress.IPv6Network((address, 48), strict=False)
    return not any(e.address in site for e in own)


def select_candidates(
    candidates: Iterable[Candidate],
    locals: Iterable[Endpoint],
    own: Iterable[Endpoint],
    peer_name: str,
) -> Selection:
    """Keep each transport address once, of a family we hold a port in, never our
    own, IPv6 first, at most 8.

    Args:
        candidates: the peer's, in the introduction's order (server-reflexive first).
        locals: the endpoints our listener holds, at most one per family.
        own: our other endpoints (chosen local, host candidates, server-reflexive).
        peer_name: for the error message.

    Returns:
        the :class:`Selection`; duplicates go (RFC 8445 §5.1.3: one check per
        transport address), as do families we hold no port in, unique local
        IPv6 candidates outside our /48s, our own endpoints
        (:func:`punch.reuse.check_not_self`) and everything past the first
        :data:`MAX_DIALED_CANDIDATES`. IPv6 candidates come before IPv4 ones,
        each family in the introduction's order (RFC 6724 §10.3's default
        policy; RFC 8305 §4).

    Raises:
        SelfDialError: some candidates were offered and every one is our own endpoint.
    """
    dial: list[Candidate] = []
    skipped: list[Skipped] = []
    self_dials: list[SelfDialError] = []
    seen: set[Endpoint] = set()
    own = tuple(own)
    by_family = {local.family: local for local in locals}
    for candidate in candidates:
        if candidate.endpoint in seen:
            skipped.append(Skipped(candidate, "same endpoint as an earlier candidate"))
            continue
        seen.add(candidate.endpoint)
        local = by_family.get(candidate.endpoint.family)
        if local is None:
            held = " or ".join(f.name for f in by_family) or "no family"
            skipped.append(Skipped(candidate, f"not {held} like our port"))
            continue
        if _ula_unreachable(candidate.endpoint, own):
            skipped.append(Skipped(candidate, "unique local address outside our /48s"))
            continue
        try:
            check_not_self(candidate.endpoint, local, own)
        except SelfDialError as exc:
            skipped.append(Skipped(candidate, str(exc)))
            self_dials.append(exc)
            continue
        dial.append(candidate)
    dial.sort(key=lambda c: c.endpoint.family != socket.AF_INET6)  # stable: IPv6 first
    if not dial and self_dials:
        raise SelfDialError(
            f"every candidate of {peer_name!r} is our own endpoint: "
            + "; ".join(str(e) for e in self_dials)
        )
    over = f"only the first {MAX_DIALED_CANDIDATES} candidates are dialled"
    skipped += [Skipped(c, over) for c in dial[MAX_DIALED_CANDIDATES:]]
    return Selection(tuple(dial[:MAX_DIALED_CANDIDATES]), tuple(skipped))
