"""The exceptions punch raises; all of them derive from :class:`PunchError`.

Connection-level failures also derive from :class:`OSError`, as
``trio.open_tcp_stream``'s do, so code that already handles socket errors
handles a failed punch too.
"""

from __future__ import annotations

from typing import Any


class PunchError(Exception):
    """Base class of every exception defined by punch."""


class ProtocolError(PunchError):
    """A rendezvous or handshake message broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """*We* tried to send something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The *other side* sent something malformed, oversized or out of order.

    Attributes:
        code: the rendezvous error code that answers it (``"protocol-error"``
            unless a more precise one applies).
    """

    def __init__(self, message: str, *, code: str = "protocol-error") -> None:
        super().__init__(message)
        self.code = code


class ReuseUnavailable(PunchError, OSError):
    """The OS cannot bind several TCP sockets to one ip:port.

    punch needs ``SO_REUSEADDR`` and ``SO_REUSEPORT`` (socket(7)) so that the
    listener, the rendezvous control connection and every dial share one port.
    """


class SelfDialError(PunchError, OSError):
    """We were asked to dial our own endpoint, or TCP connected us to ourselves.

    Raised before any SYN is sent when the remote endpoint equals one of our own
    local or server-reflexive endpoints, and after connect when
    ``getsockname() == getpeername()`` (a TCP self-connect, which RFC 9293
    §3.5 simultaneous open allows a socket to make with itself).
    """


class HandshakeError(PunchError, OSError):
    """A punched TCP stream failed authentication and was closed.

    Wrong secret, an echoed nonce (self-connect), a role claim that contradicts
    the introduction, a stale attempt id, or a peer that hung up mid-handshake.
    """


class HandshakeInterrupted(HandshakeError):
    """The connection closed or reset before the handshake finished.

    Unlike a failed proof, this says nothing about who is at the other end
    (loss, a NAT timing out, the peer's race closing a loser), so the race
    dials that candidate again.
    """


class PeerVerificationError(HandshakeError):
    """The peer's key is not the one expected: the punched stream was closed.

    Raised when the peer's TLS certificate does not carry the key it
    registered at the rendezvous (a rendezvous, or someone on its path, swapped
    keys), when its key's peer ID is not the one the application pinned
    (``connect(peer, peer_id=...)``: the rendezvous introduced another host),
    when the peer refused our certificate, and when one side would encrypt and
    the other would not (a downgrade to plaintext is refused).

    Attributes:
        expected: the peer ID we required, or ``None``.
        presented: the peer ID the peer's certificate carries, or ``None``.
    """

    def __init__(
        self, message: str, *, expected: str | None = None, presented: str | None = None
    ) -> None:
        super().__init__(message)
        self.expected = expected
        self.presented = presented


class RendezvousError(PunchError, OSError):
    """The rendezvous server refused a request or could not be reached.

    Attributes:
        code: the server's error code (``"name-taken"``, ``"unknown-peer"``,
            ``"same-peer"``, ``"protocol-error"``, ``"registration-timeout"``),
            or ``"unreachable"``, ``"timeout"``, ``"closed"`` for failures seen
            on our side.
        detail: the explanation, without the code.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class NameTaken(RendezvousError):
    """The name we registered belongs to another key (code ``name-taken``).

    A rendezvous binds each name to the key that registered it: while that
    holder is connected, and, on a server run with ``--persist-names``, for
    good (trust on first use). Registering it with another key is refused.
    """


class RelayRefused(PunchError, ConnectionError):
    """The relay refused to bind our relayed stream (its ``Error`` frame).

    Attributes:
        code: the relay's code: ``bad-ticket``, ``bad-proof``, ``expired``,
            ``attempt-used``, ``role-taken``, ``relay-full``, ``peer-limit``,
            ``peer-quota``, ``bind-timeout``, ``too-many-connections`` (see
            :class:`punch.RelayLimits`).
        detail: its text.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"relay refused: {code}: {detail}")
        self.code = code
        self.detail = detail


class PunchFailed(PunchError, OSError):
    """No candidate produced an authenticated, nominated stream before the deadline.

    Attributes:
        attempts: every connect attempt, in the order they ended: a tuple of
            ``punch.Attempt`` (candidate, number, start and end in seconds
            from the introduction, outcome, error).
        authentication_failed: some stream connected but failed the
            handshake's proof (a stranger, or the wrong secret), outbound or
            inbound; an interrupted handshake does not count.
        probes: a birthday punch's probes (``punch.ProbeReport``: side, probes
            sent, their outcomes, descriptors open at once), or None when the
            punch made none.

    ``__cause__`` is an :class:`ExceptionGroup` holding one
    :class:`CandidateFailed` per candidate dialled (and one
    :class:`HandshakeError` per inbound stream that failed authentication).
    """

    def __init__(
        self,
        message: str,
        attempts: tuple[Any, ...] = (),
        authentication_failed: bool = False,
        probes: Any = None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.authentication_failed = authentication_failed
        self.probes = probes


class CandidateFailed(PunchError, OSError):
    """Every attempt to one remote candidate failed.

    Attributes:
        candidate: the :class:`~punch.Candidate` that was dialled.
        attempts: how many connect attempts were made (0 if it was skipped).

    ``__cause__`` is the error of the last attempt.
    """

    def __init__(self, candidate: object, attempts: int, last: BaseException) -> None:
        super().__init__(f"{candidate}: {attempts} attempt(s), last: {_describe(last)}")
        self.candidate = candidate
        self.attempts = attempts
        self.__cause__ = last


def _describe(exc: BaseException) -> str:
    """One short line for an exception: ``ConnectionRefusedError: [Errno 111] ...``."""
    text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text}"
