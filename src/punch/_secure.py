"""TLS 1.3 on the nominated stream, with the peer's registered key and an optional pinned peer ID.

The initiator is the TLS client, the responder the server; each presents the
self-signed certificate of its :class:`~punch.Identity` and accepts only the
one the peer registered at the rendezvous (from the introduction). With a
pinned peer ID, the introduction's key must also be the one the application
expects, so a rendezvous that lies cannot stand in for the peer.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from functools import partial

import trio

from . import reuse
from ._endpoint import Role
from ._errors import HandshakeInterrupted, PeerVerificationError
from ._identity import Identity, certificate_key, peer_id
from ._protocol import Introduction
from ._stream import PeerStream

log = logging.getLogger("punch.secure")


def introduced_peer_id(introduction: Introduction, expected: str | None) -> str:
    """The peer ID of the key the rendezvous introduced, checked against ``expected``.

    Raises:
        PeerVerificationError: the introduced certificate is not a self-signed
            Ed25519 one, or its peer ID is not ``expected`` (the rendezvous
            introduced another host).
    """
    presented = peer_id(certificate_key(introduction.certificate))
    if expected is not None and presented != expected:
        raise PeerVerificationError(
            f"the rendezvous introduced {introduction.peer_name!r} with peer ID {presented}, "
            f"not the pinned {expected}",
            expected=expected,
            presented=presented,
        )
    return presented


def race_context(
    identity: Identity, introduction: Introduction, encrypt: bool
) -> Callable[[], ssl.SSLContext] | None:
    """What makes our TLS context for the race (client as the initiator, server as
    the responder), so that TLS's first flights ride the handshake's
    (:mod:`punch._handshake`); ``None`` for a plaintext punch. It is called as
    each stream comes up, not before the SYNs; the context itself is built as
    the host opens (:meth:`~punch.Identity.prepare_tls`). Calling it raises
    :class:`ssl.SSLError` or ``ValueError`` for a certificate OpenSSL cannot
    load; :func:`encrypt` then refuses it with its typed error.
    """
    if not encrypt:
        return None
    server_side = introduction.role is Role.RESPONDER
    return partial(identity.tls_context, introduction.certificate, server_side=server_side)


async def encrypt(
    stream: PeerStream,
    identity: Identity,
    introduction: Introduction,
    expected: str | None,
    timeout: float,
) -> None:
    """Run TLS on ``stream`` (in place); on any failure the socket is aborted.

    Args:
        stream: the nominated plaintext stream.
        identity: ours.
        introduction: names the peer's registered certificate and our role.
        expected: the pinned peer ID, or ``None``.
        timeout: seconds (> 0) the TLS handshake may take.

    Raises:
        PeerVerificationError: the peer's certificate is not the one it
            registered, or not the pinned one, or the peer refused ours.
        HandshakeInterrupted: the connection broke or the handshake timed out.
    """
    started = trio.current_time()
    server_side = introduction.role is Role.RESPONDER
    try:
        presented = introduced_peer_id(introduction, expected)
        context = identity.tls_context(introduction.certificate, server_side=server_side)
        # TLS's flights, like the punch's, are resent at least each second (the race's cap
        # holds until the peer's first application bytes: PeerStream.receive_some)
        with trio.move_on_after(timeout) as scope:
            tls = await stream.start_tls(context, server_side=server_side)
        if scope.cancelled_caught:
            raise HandshakeInterrupted(f"no TLS handshake within {timeout:g} s")
        # OpenSSL also trusts peers introduced to us before (Identity.tls_context): exactly
        # the introduced certificate, or nothing
        if tls.ssl_object.getpeercert(binary_form=True) != introduction.certificate:
            raise PeerVerificationError(
                "the peer's TLS certificate is not the one it registered",
                expected=expected,
                presented=presented,
            )
    except trio.BrokenResourceError as exc:
        reuse.abort(stream.socket)
        raise _tls_failure(exc, expected, presented) from exc
    except BaseException:
        reuse.abort(stream.socket)
        raise
    stream.peer_id = presented
    stream.tls_time = trio.current_time() - started
    stream.connect_time += stream.tls_time
    log.info(
        "TLS 1.3 with %r, peer ID %s, in %.1f ms",
        introduction.peer_name,
        presented,
        stream.tls_time * 1000,
    )


def _tls_failure(
    exc: trio.BrokenResourceError, expected: str | None, presented: str
) -> PeerVerificationError | HandshakeInterrupted:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return PeerVerificationError(
            f"the peer's TLS certificate is not the one it registered: {cause.verify_message}",
            expected=expected,
            presented=presented,
        )
    if isinstance(cause, ssl.SSLError):  # an alert: the peer refused our certificate
        return PeerVerificationError(
            f"TLS handshake refused: {cause.reason or cause}",
            expected=expected,
            presented=presented,
        )
    return HandshakeInterrupted(f"connection lost during the TLS handshake: {cause or exc}")
