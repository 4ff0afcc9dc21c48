"""The peer-to-peer handshake on a punched TCP stream, as a sans-IO state machine.

Before any application byte, each side proves knowledge of the introduction's
single-use secret, and the initiator nominates the one connection both keep
(RFC 8445 §8.1.1: the controlling agent nominates). :class:`Handshake` takes
bytes and gives bytes and a stage; it never does I/O, so ``_race.py`` only
moves bytes and keeps time, and tests drive it with bytes alone.

Wire (fixed sizes, but for the ClientHello, which its length precedes)::

    Hello      = b"PNCH" | version u8 | role u8 | attempt_id[16] | nonce[16]
                 | flags u8                                                 (39 bytes)
    ClientHello = length u16 | TLS ClientHello record (1..MAX_CLIENT_HELLO bytes)
    Proof      = HMAC-SHA256(secret, b"punch-handshake-v5" | attempt_id
                             | responder_nonce | responder_flags | 2)      (32 bytes)
    Nomination = b"N" | HMAC-SHA256(secret, b"punch-handshake-v5" | attempt_id
                             | initiator_nonce | responder_nonce
                             | initiator_flags | responder_flags | 1)      (33 bytes)

    flags: bit 0 set = this side will run TLS 1.3 after the nomination;
           bit 1 set = a ClientHello follows this Hello (the initiator's, with bit 0).
    The MACs cover bit 0 only: bit 1 only frames bytes, and TLS authenticates
    the ClientHello itself (its transcript, RFC 8446 §4.4.1).

Each side speaks the moment its TCP connection is up, without waiting for the
peer: the initiator its Hello, and when it encrypts its TLS ClientHello after
it; the responder its Hello and its Proof in one segment
(:meth:`Handshake.opening`). A responder that reads a ClientHello answers it
at once with its TLS server flight (``_race.py``), before any Nomination. The
initiator, once it has read a Hello and a Proof that checks out, sends the
Nomination and holds the stream: it does not wait for an acknowledgement (no
message follows), since the initiator nominates exactly one stream. A
simultaneous open (RFC 9293 §3.5) has both ends' connections up one round
trip after the SYNs, so the initiator holds its stream 1.5 round trips after
it dials and the responder 2; a direct connect plus one authenticating
exchange costs 2 for its client, whose server learns of the connection only
half a round trip after it. (In version 3 the responder's Proof answered the
initiator's Hello, half a round trip later: 2 and 2.5 round trips. Measured
at 10 ms round trips in the netns lab, README "Performance".) Under loss, one
message fewer is on the initiator's path.

TLS rides the same flights (version 5). In version 4 the ClientHello left with
the Nomination, so an encrypted stream took three flights after the TCP
handshake before the initiator held it: the responder's Proof, the
initiator's Nomination and ClientHello, the responder's server flight. Now
the ClientHello leaves with the Hello and the server flight answers it, in
parallel with the Proof: two flights (the ClientHello, the server flight),
half a round trip sooner, and under loss one retransmission fewer on the
path (each about a second: a punch's round trip estimate, taken across
retransmitted SYNs, is seconds; see :func:`punch.reuse.cap_retransmission_timeout`).
What the server flight gives away before the Nomination: the responder's
certificate (encrypted, but to whoever sent the ClientHello) and one
signature, to any connection that presents a Hello of the attempt. The
certificate is the key the responder registered, which the rendezvous gives
every peer it is introduced to; a stranger still cannot finish TLS as the
initiator (its certificate must be the initiator's registered one), nor be
nominated (the Nomination's MAC needs the secret).

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

VERSION = 5
_TRANSCRIPT = b"punch-handshake-v5"
NONCE_BYTES = 16
_HELLO = struct.Struct(f"!4sBB{ATTEMPT_ID_BYTES}s{NONCE_BYTES}sB")
_ENCRYPT = 0x01
_CLIENT_HELLO = 0x02
_MAGIC = b"PNCH"
_ROLE_BYTE = {Role.INITIATOR: 1, Role.RESPONDER: 2}
_BYTE_ROLE = {v: k for k, v in _ROLE_BYTE.items()}
_NOMINATE = b"N"
HELLO_SIZE = _HELLO.size
PROOF_SIZE = hashlib.sha256().digest_size
NOMINATION_SIZE = len(_NOMINATE) + PROOF_SIZE
_LENGTH = struct.Struct("!H")
MAX_CLIENT_HELLO = 16389
"""Bytes: one TLS record, its 5-byte header and the largest plaintext (RFC 8446 §5.1)."""


@attrs.frozen
class Hello:
    """A decoded Hello: who claims to be speaking, in which attempt."""

    role: Role
    attempt_id: bytes
    nonce: bytes
    encrypt: bool
    client_hello_follows: bool = False


def parse_hello(data: bytes) -> Hello:
    """Decode exactly :data:`HELLO_SIZE` bytes.

    Raises:
        HandshakeError: wrong size, magic, version, role byte or flags (a
            ClientHello announced without encryption).
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
    if flags & ~(_ENCRYPT | _CLIENT_HELLO) or flags == _CLIENT_HELLO:
        raise HandshakeError(f"unknown flags {flags:#04x}")
    return Hello(
        _BYTE_ROLE[role], attempt_id, nonce, bool(flags & _ENCRYPT), bool(flags & _CLIENT_HELLO)
    )


class Stage(enum.Enum):
    """Where one side's handshake stands; :attr:`Handshake.expecting` says what it reads next."""

    HELLO = "hello"
    """Waiting for the peer's Hello."""
    CLIENT_HELLO_SIZE = "client-hello-size"
    """Responder: the Hello announced a ClientHello; waiting for its length."""
    CLIENT_HELLO = "client-hello"
    """Responder: waiting for the ClientHello itself (:attr:`Handshake.expecting` bytes)."""
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
    Stage.CLIENT_HELLO_SIZE: _LENGTH.size,
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

    Use: send :meth:`opening` at once (the initiator that encrypts passes its
    ClientHello); then, while :attr:`expecting` is not 0, read exactly that
    many bytes and pass them to :meth:`receive`. A responder answers
    :attr:`client_hello` as soon as it is set (TLS's server flight). The
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
    client_hello: bytes | None = attrs.field(default=None, init=False)
    """Responder: the initiator's TLS ClientHello, once read (None if it sent none)."""
    stage: Stage = attrs.field(default=Stage.HELLO, init=False)
    _client_hello_size: int = attrs.field(default=0, init=False)

    @property
    def expecting(self) -> int:
        """Bytes the next message from the peer takes; 0 when none is due."""
        if self.stage is Stage.CLIENT_HELLO:
            return self._client_hello_size
        return _EXPECTING[self.stage]

    def opening(self, client_hello: bytes = b"") -> bytes:
        """What we send the moment the stream is up, before reading anything: our
        Hello, then as the initiator our ``client_hello`` (a TLS ClientHello record,
        its length first) if we have one, or as the responder our Proof
        (:data:`HELLO_SIZE` bytes, plus 2 and the ClientHello's, or plus
        :data:`PROOF_SIZE`).

        Raises:
            HandshakeError: a ClientHello from the responder or from a side that
                does not encrypt, or longer than :data:`MAX_CLIENT_HELLO`.
        """
        if self.role is Role.RESPONDER:
            if client_hello:
                raise HandshakeError("the responder is the TLS server: it sends no ClientHello")
            return self.hello() + self._mac(Role.RESPONDER)
        if not client_hello:
            return self.hello()
        if not self.encrypt or len(client_hello) > MAX_CLIENT_HELLO:
            raise HandshakeError(
                f"cannot send a {len(client_hello)}-byte ClientHello (encrypt={self.encrypt})"
            )
        framed = self.hello(self._flags | _CLIENT_HELLO) + _LENGTH.pack(len(client_hello))
        return framed + client_hello

    def hello(self, flags: int | None = None) -> bytes:
        """Our Hello alone, :data:`HELLO_SIZE` bytes (:meth:`opening` is what is sent);
        ``flags``: default ours (bit 0, encryption)."""
        flags = self._flags if flags is None else flags
        return _HELLO.pack(
            _MAGIC, VERSION, _ROLE_BYTE[self.role], self.attempt_id, self.nonce, flags
        )

    @property
    def _flags(self) -> int:
        return _ENCRYPT if self.encrypt else 0

    def receive(self, message: bytes) -> None:
        """Take the peer's next message (exactly :attr:`expecting` bytes); the
        handshake itself sends nothing in answer (our :meth:`opening` went first;
        the initiator's :meth:`nominate` follows at :attr:`Stage.AUTHENTICATED`;
        TLS answers :attr:`client_hello`).

        Raises:
            HandshakeError: a malformed Hello, our own nonce back (self-connect or
                reflection), another attempt's id, a role that is not the
                opposite of ours, a ClientHello from the responder or of a
                length outside 1..:data:`MAX_CLIENT_HELLO`, a MAC that does not
                prove the secret, or a message when none is due.
            PeerVerificationError: (a :class:`HandshakeError`) the peer's Hello
                does not agree on encryption: a downgrade, refused.
        """
        if len(message) != self.expecting or not self.expecting:
            raise HandshakeError(
                f"{len(message)} bytes at stage {self.stage.value}, expected {self.expecting}"
            )
        if self.stage is Stage.HELLO:
            hello = parse_hello(message)
            self._receive_hello(hello)
            if self.role is Role.INITIATOR:
                self.stage = Stage.PROOF
            elif hello.client_hello_follows:
                self.stage = Stage.CLIENT_HELLO_SIZE
            else:
                self.stage = Stage.NOMINATION
        elif self.stage is Stage.CLIENT_HELLO_SIZE:
            (self._client_hello_size,) = _LENGTH.unpack(message)
            if not 0 < self._client_hello_size <= MAX_CLIENT_HELLO:
                raise HandshakeError(f"a ClientHello of {self._client_hello_size} bytes")
            self.stage = Stage.CLIENT_HELLO
        elif self.stage is Stage.CLIENT_HELLO:
            self.client_hello = bytes(message)
            self.stage = Stage.NOMINATION
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
        if hello.client_hello_follows and hello.role is not Role.INITIATOR:
            raise HandshakeError("a ClientHello from the responder, which is the TLS server")
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
