"""The peer-to-peer handshake on a punched TCP stream, as a sans-IO state machine.

Before any application byte, each side proves knowledge of the introduction's
single-use secret, and the initiator nominates the one connection both keep
(RFC 8445 §8.1.1: the controlling agent nominates). :class:`Handshake` takes
bytes and gives bytes and a stage; it never does I/O, so ``_race.py`` only
moves bytes and keeps time, and tests drive it with bytes alone.

Wire (all fixed size, so each read is exact)::

    Hello      = b"PNCH" | version u8 | role u8 | attempt_id[16] | nonce[16]
                 | flags u8                                                 (39 bytes)
    Proof      = HMAC-SHA256(secret, b"punch-handshake-v4" | attempt_id
                             | responder_nonce | responder_flags | 2)      (32 bytes)
    Nomination = b"N" | HMAC-SHA256(secret, b"punch-handshake-v4" | attempt_id
                             | initiator_nonce | responder_nonce
                             | initiator_flags | responder_flags | 1)      (33 bytes)

    flags: bit 0 set = this side will run TLS 1.3 after the nomination.

Each side speaks the moment its TCP connection is up, without waiting for the
peer: the initiator its Hello, the responder its Hello and its Proof in one
segment (:meth:`Handshake.opening`). The initiator, once it has read a Hello
and a Proof that checks out, sends the Nomination and holds the stream: it
does not wait for an acknowledgement (no message follows), since the
initiator nominates exactly one stream. A simultaneous open (RFC 9293
§3.5) has both ends' connections up one round trip after the SYNs, so the
initiator holds its stream 1.5 round trips after it dials and the responder 2;
a direct connect plus one authenticating exchange costs 2 for its client,
whose server learns of the connection only half a round trip after it. (In
version 3 the responder's Proof answered the initiator's Hello, half a round
trip later: 2 and 2.5 round trips. Measured at 10 ms round trips in the
netns lab, README "Performance".) Under loss, one message fewer is on the
initiator's path.

Why replay and reflection stay impossible: every MAC covers the attempt id,
whose secret is single-use, so nothing from another attempt verifies; and it
covers the sender's role, and the two transcripts differ, so a MAC reflected
back at its author fails, as does a Hello claiming our own role. Our own
nonce coming back means a TCP self-connect or a reflector. The Nomination
covers both sides' fresh nonces, so one recorded on one connection of this
attempt does not verify on another: a responder keeps only a stream it was
nominated on. The Proof covers only the responder's nonce (it leaves before
the initiator's Hello is read), so one recorded on one connection of this
attempt verifies on another of the same attempt, for the attempt's life (its
timeout). That gives nothing new: a Hello carries no MAC, so whoever holds
connections to both sides of an attempt could always relay each side's Hello
and so have the responder prove the nonces it chose (the splicing below); and
the stream such a replay wins fails at TLS, which needs the peer's registered
key (``_secure.py``), so it can end a punch, not take one over. With
``encrypt=False`` such a stream is taken over, as a spliced one always was:
plaintext streams are for applications that bring their own security.

Downgrade: both sides must agree on encryption. A Hello whose flag differs from
ours is refused at once (:class:`PeerVerificationError`): a side that encrypts
never gives its application a plaintext stream, and a side that does not never
hands TLS records to its application as data. Both MACs cover both flags, so a
flag changed on the path fails the Proof or the Nomination as well. What the
MACs do not stop: an on-path attacker splicing two connections, or the
rendezvous (which knows the secret) posing as the peer; TLS with the peer's
registered key, and a pinned peer ID, stop those (``_secure.py``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct

import attrs

from ._endpoint import Role
from ._errors import HandshakeError, PeerVerificationError
from ._protocol import ATTEMPT_ID_BYTES

VERSION = 4
_TRANSCRIPT = b"punch-handshake-v4"
NONCE_BYTES = 16
_HELLO = struct.Struct(f"!4sBB{ATTEMPT_ID_BYTES}s{NONCE_BYTES}sB")
_ENCRYPT = 0x01
_MAGIC = b"PNCH"
_ROLE_BYTE = {Role.INITIATOR: 1, Role.RESPONDER: 2}
_BYTE_ROLE = {v: k for k, v in _ROLE_BYTE.items()}
_NOMINATE = b"N"
HELLO_SIZE = _HELLO.size
PROOF_SIZE = hashlib.sha256().digest_size
NOMINATION_SIZE = len(_NOMINATE) + PROOF_SIZE


@attrs.frozen
class Hello:
    """A decoded Hello: who claims to be speaking, in which attempt."""

    role: Role
    attempt_id: bytes
    nonce: bytes
    encrypt: bool


def parse_hello(data: bytes) -> Hello:
    """Decode exactly :data:`HELLO_SIZE` bytes.

    Raises:
        HandshakeError: wrong size, magic, version or role byte.
    """
    if len(data) != HELLO_SIZE:
        raise HandshakeError(f"hello must be {HELLO_SIZE} bytes, got {len(data)}")
    magic, version, role, attempt_id, nonce, flags = _HELLO.unpack(data)
    if magic != _MAGIC:
        raise HandshakeError("not a punch handshake")
    if version != VERSION:
        raise HandshakeError(f"handshake version {version}, expected {VERSION}")
    if role not in _BYTE_ROLE:
        raise HandshakeError(f"unknown role byte {role}")
    if flags & ~_ENCRYPT:
        raise HandshakeError(f"unknown flags {flags:#04x}")
    return Hello(_BYTE_ROLE[role], attempt_id, nonce, bool(flags & _ENCRYPT))


class Stage(enum.Enum):
    """Where one side's handshake stands; :attr:`Handshake.expecting` says what it reads next."""

    HELLO = "hello"
    """Waiting for the peer's Hello."""
    PROOF = "proof"
    """Initiator: waiting for the responder's Proof."""
    NOMINATION = "nomination"
    """Responder: waiting for the initiator's Nomination."""
    AUTHENTICATED = "authenticated"
    """Initiator: the responder proved the secret; :meth:`Handshake.nominate` may follow."""
    NOMINATED = "nominated"
    """Done: this stream is the one both keep (responder: a valid Nomination came;
    initiator: it sent one)."""


_EXPECTING = {
    Stage.HELLO: HELLO_SIZE,
    Stage.PROOF: PROOF_SIZE,
    Stage.NOMINATION: NOMINATION_SIZE,
    Stage.AUTHENTICATED: 0,
    Stage.NOMINATED: 0,
}


@attrs.define
class Handshake:
    """One side of the handshake on one stream: bytes in, bytes out, a :class:`Stage`.

    Args:
        role: our role from the introduction.
        attempt_id: the introduction's attempt id (16 bytes).
        secret: the introduction's secret (32 bytes).
        nonce: 16 fresh random bytes (default: :func:`secrets.token_bytes`).
        encrypt: we will run TLS after the nomination, and require the peer to.

    Use: send :meth:`opening` at once; then, while :attr:`expecting` is not 0,
    read exactly that many bytes and pass them to :meth:`receive`. The
    initiator then sends :meth:`nominate` on the one stream it keeps. Every
    method raises :class:`HandshakeError` on the first thing that is wrong,
    and the stream must then be closed.
    """

    role: Role
    attempt_id: bytes = attrs.field(repr=lambda b: b.hex())
    secret: bytes = attrs.field(repr=lambda _: "<secret>")
    nonce: bytes = attrs.field(factory=lambda: secrets.token_bytes(NONCE_BYTES))
    encrypt: bool = True
    peer_nonce: bytes | None = attrs.field(default=None, init=False)
    stage: Stage = attrs.field(default=Stage.HELLO, init=False)

    @property
    def expecting(self) -> int:
        """Bytes the next message from the peer takes; 0 when none is due."""
        return _EXPECTING[self.stage]

    def opening(self) -> bytes:
        """What we send the moment the stream is up, before reading anything: our
        Hello, and as the responder our Proof after it (:data:`HELLO_SIZE` bytes, or
        that plus :data:`PROOF_SIZE`)."""
        if self.role is Role.RESPONDER:
            return self.hello() + self._mac(Role.RESPONDER)
        return self.hello()

    def hello(self) -> bytes:
        """Our Hello alone, :data:`HELLO_SIZE` bytes (:meth:`opening` is what is sent)."""
        return _HELLO.pack(
            _MAGIC, VERSION, _ROLE_BYTE[self.role], self.attempt_id, self.nonce, self._flags
        )

    @property
    def _flags(self) -> int:
        return _ENCRYPT if self.encrypt else 0

    def receive(self, message: bytes) -> None:
        """Take the peer's next message (exactly :attr:`expecting` bytes); nothing is
        sent in answer (our :meth:`opening` went first; the initiator's
        :meth:`nominate` follows at :attr:`Stage.AUTHENTICATED`).

        Raises:
            HandshakeError: a malformed Hello, our own nonce back (self-connect or
                reflection), another attempt's id, a role that is not the
                opposite of ours, a MAC that does not prove the secret, or a
                message when none is due.
            PeerVerificationError: (a :class:`HandshakeError`) the peer's Hello
                does not agree on encryption: a downgrade, refused.
        """
        if len(message) != self.expecting or not self.expecting:
            raise HandshakeError(
                f"{len(message)} bytes at stage {self.stage.value}, expected {self.expecting}"
            )
        if self.stage is Stage.HELLO:
            self._receive_hello(parse_hello(message))
            self.stage = Stage.NOMINATION if self.role is Role.RESPONDER else Stage.PROOF
        elif self.stage is Stage.PROOF:
            self._verify(message, Role.RESPONDER, "proof")
            self.stage = Stage.AUTHENTICATED
        else:
            if message[:1] != _NOMINATE:
                raise HandshakeError("initiator sent garbage instead of a nomination")
            self._verify(message[1:], Role.INITIATOR, "nomination")
            self.stage = Stage.NOMINATED

    def nominate(self) -> bytes:
        """Initiator: the Nomination for this stream, :data:`NOMINATION_SIZE` bytes.

        Raises:
            HandshakeError: we are the responder, or the peer is not yet authenticated.
        """
        if self.role is not Role.INITIATOR or self.stage is not Stage.AUTHENTICATED:
            raise HandshakeError(f"cannot nominate as {self.role.value} at {self.stage.value}")
        self.stage = Stage.NOMINATED
        return _NOMINATE + self._mac(Role.INITIATOR)

    def _receive_hello(self, hello: Hello) -> None:
        if hmac.compare_digest(hello.nonce, self.nonce):
            raise HandshakeError("peer echoed our own nonce: self-connect or reflection")
        if not hmac.compare_digest(hello.attempt_id, self.attempt_id):
            raise HandshakeError("hello is for another punch attempt")
        if hello.role is not self.role.other:
            raise HandshakeError(f"peer claims role {hello.role.value}, we are {self.role.value}")
        if hello.encrypt is not self.encrypt:
            ours, theirs = ("TLS", "plaintext") if self.encrypt else ("plaintext", "TLS")
            raise PeerVerificationError(f"peer wants {theirs}, we require {ours}: refused")
        self.peer_nonce = hello.nonce

    def _mac(self, sender: Role) -> bytes:
        """The Proof's MAC (``sender`` the responder) or the Nomination's (the initiator)."""
        if sender is Role.RESPONDER:  # made before the initiator's Hello is read
            ours = self.role is Role.RESPONDER
            responder_nonce = self.nonce if ours else self.peer_nonce
            assert responder_nonce is not None  # the initiator checks after the Hello
            fields = responder_nonce + bytes([self._flags, _ROLE_BYTE[sender]])
        else:
            assert self.peer_nonce is not None  # only after the peer's Hello
            if self.role is Role.INITIATOR:
                nonces = self.nonce + self.peer_nonce
            else:
                nonces = self.peer_nonce + self.nonce
            # flags: the peer's equal ours, or its Hello was refused
            fields = nonces + bytes([self._flags, self._flags, _ROLE_BYTE[sender]])
        return hmac.digest(self.secret, _TRANSCRIPT + self.attempt_id + fields, "sha256")

    def _verify(self, mac: bytes, sender: Role, what: str) -> None:
        if not hmac.compare_digest(mac, self._mac(sender)):
            raise HandshakeError(f"peer's {what} does not match the introduction's secret")
