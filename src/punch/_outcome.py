"""What each connect attempt of a punch came to, as data on PeerStream and PunchFailed."""

from __future__ import annotations

import enum
import errno
from collections.abc import Hashable, Iterable
from typing import Any

import attrs

from ._endpoint import Candidate
from ._errors import HandshakeError, HandshakeInterrupted, RelayRefused, SelfDialError, _describe

REFUSALS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES})
"""errnos of an attempt that was refused on the path: an RST (``ECONNREFUSED``)
or an ICMP destination unreachable (port: ``ECONNREFUSED``; host, net or
administratively prohibited: ``EHOSTUNREACH``/``ENETUNREACH``; ICMPv6
administratively prohibited: ``EACCES``, Linux's icmpv6_err_convert; RFC 1122
§4.2.3.9 lets Linux abort a SYN_SENT socket on them, tcp(7))."""


class Outcome(enum.Enum):
    """How one connect attempt ended."""

    NOMINATED = "nominated"
    """Connected, authenticated, and the stream both keep."""
    AUTHENTICATED = "authenticated"
    """Connected and authenticated, but another stream was nominated."""
    REFUSED = "refused"
    """An RST or an ICMP unreachable came back (:data:`REFUSALS`)."""
    NO_ANSWER = "no-answer"
    """No answer to the SYN: given up after a refusal, or still unanswered at the deadline."""
    ADDRESS_IN_USE = "address-in-use"
    """``EADDRNOTAVAIL``: another connection (often an inbound half-open one) holds the 4-tuple."""
    HANDSHAKE_FAILED = "handshake-failed"
    """Connected, but the other end failed authentication (a stranger, or ourselves)."""
    HANDSHAKE_INTERRUPTED = "handshake-interrupted"
    """Connected, but the connection closed or reset during the handshake."""
    HANDSHAKE_UNFINISHED = "handshake-unfinished"
    """Connected, but the handshake had not finished at the deadline (its messages
    lost or late: under loss, TCP retransmits them a timeout later)."""
    RELAY_REFUSED = "relay-refused"
    """The relay refused to bind the relayed stream (:class:`~punch.RelayRefused`)."""
    SELF_DIAL = "self-dial"
    """The candidate is our own endpoint: never dialled (or a TCP self-connect)."""
    PRIMED = "primed"
    """A SYN that opens our own NAT's entry and expires before the peer's NAT
    (:func:`punch.reuse.prime`), sent after an RST refusal; the next attempt
    connects the same socket."""
    CANCELLED = "cancelled"
    """Under way when another path won."""
    ERROR = "error"
    """Any other error (``Network is unreachable`` from our own routing table...)."""


def classify(error: BaseException) -> Outcome:
    """The :class:`Outcome` of an attempt that failed with ``error``."""
    if isinstance(error, SelfDialError):
        return Outcome.SELF_DIAL
    if isinstance(error, RelayRefused):
        return Outcome.RELAY_REFUSED
    if isinstance(error, HandshakeInterrupted):
        return Outcome.HANDSHAKE_INTERRUPTED
    if isinstance(error, HandshakeError):
        return Outcome.HANDSHAKE_FAILED
    if isinstance(error, TimeoutError):
        return Outcome.NO_ANSWER
    code = getattr(error, "errno", None)
    if code in REFUSALS:
        return Outcome.REFUSED
    if code in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
        return Outcome.ADDRESS_IN_USE
    return Outcome.ERROR


@attrs.frozen
class Attempt:
    """One connect attempt to one candidate.

    Attributes:
        candidate: the remote :class:`~punch.Candidate` dialled.
        number: 1 for the first attempt to this candidate, then 2, 3...
        started: seconds from the introduction to the attempt's start.
        ended: seconds from the introduction to its outcome.
        outcome: :class:`Outcome`.
        error: the error in one line (``ConnectionRefusedError: ...``), or
            ``None`` when it connected.
        probe: a birthday punch's probe that connected (:mod:`punch._birthday`;
            the rest are counted on :class:`~punch.ProbeReport`): paced with
            the host's SYNs, not per candidate, so left out of
            :func:`max_attempts_per_second`.
    """

    candidate: Candidate
    number: int
    started: float
    ended: float
    outcome: Outcome
    error: str | None = None
    probe: bool = False

    @classmethod
    def failed(
        cls, candidate: Candidate, number: int, started: float, ended: float, error: BaseException
    ) -> Attempt:
        """An attempt that ended with ``error``."""
        return cls(candidate, number, started, ended, classify(error), _describe(error))

    def as_json(self) -> dict[str, Any]:
        """For ``punch --json`` and the lab's tools: times in seconds."""
        return {
            "candidate": str(self.candidate),
            "number": self.number,
            "started": round(self.started, 6),
            "ended": round(self.ended, 6),
            "outcome": self.outcome.value,
            "error": self.error,
            "probe": self.probe,
        }


def peak_rate(starts: Iterable[tuple[Hashable, float]]) -> int:
    """The most starts with one key within any one second.

    Args:
        starts: ``(key, seconds)`` pairs: a candidate (or its text) and when an
            attempt to it started, as in :attr:`Attempt.started` or in the
            ``attempts`` of ``punch --json``'s ``connected``/``error`` events.
    """
    by_key: dict[Hashable, list[float]] = {}
    for key, started in starts:
        by_key.setdefault(key, []).append(started)
    peak = 0
    for times in by_key.values():
        times.sort()
        first = 0
        for last, t in enumerate(times):
            while t - times[first] >= 1.0:
                first += 1
            peak = max(peak, last - first + 1)
    return peak


def max_attempts_per_second(attempts: Iterable[Attempt]) -> int:
    """The most attempts started to one candidate within any one second (RFC 8445 §14 pacing)."""
    return peak_rate((a.candidate, a.started) for a in attempts if not a.probe)
