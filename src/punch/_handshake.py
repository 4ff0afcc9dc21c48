"""The peer-to-peer handshake on a punched TCP stream, sans-IO.

Before any application byte, each side proves knowledge of the introduction's
single-use secret, and the initiator nominates the one connection both keep
(RFC 8445 §8.1.1: the controlling agent nominates).

Wire (all fixed size, so each read is exact)::

    Hello    = b"PNCH" | version u8 | role u8 | attempt_id[16] | nonce[16]   (38 bytes)
    Proof    = HMAC-SHA256(secret, transcript)                              (32 bytes)
    Nominate = b"N"     initiator -> responder: "keep this connection"
    Accept   = b"K"     responder -> initiator: "kept"

``transcript = b"punch-handshake-v1" | attempt_id | initiator_nonce |
responder_nonce | sender_role``: fresh nonces on both sides defeat replay of
an earlier attempt's proof, and the sender's role in the MAC defeats a proof
reflected back at its author.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

import attrs

from ._endpoint import Role
from ._errors import HandshakeError
from ._protocol import ATTEMPT_ID_BYTES

VERSION = 1
NONCE_BYTES = 16
_HELLO = struct.Struct(f"!4sBB{ATTEMPT_ID_BYTES}s{NONCE_BYTES}s")
_MAGIC = b"PNCH"
_ROLE_BYTE = {Role.INITIATOR: 1, Role.RESPONDER: 2}
_BYTE_ROLE = {v: k for k, v in _ROLE_BYTE.items()}
HELLO_SIZE = _HELLO.size
PROOF_SIZE = hashlib.sha256().digest_size
NOMINATE = b"N"
ACCEPT = b"K"


@attrs.frozen
class Hello:
    """A decoded Hello: who claims to be speaking, in which attempt."""

    role: Role
    attempt_id: bytes
    nonce: bytes


def parse_hello(data: bytes) -> Hello:
    """Decode exactly :data:`HELLO_SIZE` bytes.

    Raises:
        HandshakeError: wrong size, magic, version or role byte.
    """
    if len(data) != HELLO_SIZE:
        raise HandshakeError(f"hello must be {HELLO_SIZE} bytes, got {len(data)}")
    magic, version, role, attempt_id, nonce = _HELLO.unpack(data)
    if magic != _MAGIC:
        raise HandshakeError("not a punch handshake")
    if version != VERSION:
        raise HandshakeError(f"handshake version {version}, expected {VERSION}")
    if role not in _BYTE_ROLE:
        raise HandshakeError(f"unknown role byte {role}")
    return Hello(_BYTE_ROLE[role], attempt_id, nonce)


@attrs.define
class Handshake:
    """One side of the handshake on one stream.

    Args:
        role: our role from the introduction.
        attempt_id: the introduction's attempt id (16 bytes).
        secret: the introduction's secret (32 bytes).
        nonce: 16 fresh random bytes (default: :func:`secrets.token_bytes`).

    Use: send :meth:`hello`; pass the peer's to :meth:`receive_hello`; send
    :meth:`proof`; pass the peer's to :meth:`verify_proof`. Each method raises
    :class:`HandshakeError` on the first thing that is wrong.
    """

    role: Role
    attempt_id: bytes = attrs.field(repr=lambda b: b.hex())
    secret: bytes = attrs.field(repr=lambda _: "<secret>")
    nonce: bytes = attrs.field(factory=lambda: secrets.token_bytes(NONCE_BYTES))
    peer_nonce: bytes | None = None

    def hello(self) -> bytes:
        """Our Hello, :data:`HELLO_SIZE` bytes."""
        return _HELLO.pack(_MAGIC, VERSION, _ROLE_BYTE[self.role], self.attempt_id, self.nonce)

    def receive_hello(self, hello: Hello | bytes) -> None:
        """Check the peer's Hello against the introduction.

        Raises:
            HandshakeError: our own nonce came back (a TCP self-connect or a
                reflector), a different attempt id (stale or foreign), or a role
                that is not the opposite of ours.
        """
        if isinstance(hello, bytes):
            hello = parse_hello(hello)
        if hmac.compare_digest(hello.nonce, self.nonce):
            raise HandshakeError("peer echoed our own nonce: self-connect or reflection")
        if not hmac.compare_digest(hello.attempt_id, self.attempt_id):
            raise HandshakeError("hello is for another punch attempt")
        if hello.role is not self.role.other:
            raise HandshakeError(f"peer claims role {hello.role.value}, we are {self.role.value}")
        self.peer_nonce = hello.nonce

    def _mac(self, sender: Role) -> bytes:
        if self.peer_nonce is None:
            raise HandshakeError("no hello received yet")
        if self.role is Role.INITIATOR:
            nonces = self.nonce + self.peer_nonce
        else:
            nonces = self.peer_nonce + self.nonce
        transcript = b"punch-handshake-v1" + self.attempt_id + nonces + bytes([_ROLE_BYTE[sender]])
        return hmac.digest(self.secret, transcript, "sha256")

    def proof(self) -> bytes:
        """Our proof of the secret, :data:`PROOF_SIZE` bytes."""
        return self._mac(self.role)

    def verify_proof(self, proof: bytes) -> None:
        """Check the peer's proof (constant-time comparison).

        Raises:
            HandshakeError: it does not prove the introduction's secret.
        """
        if not hmac.compare_digest(proof, self._mac(self.role.other)):
            raise HandshakeError("peer's proof does not match the introduction's secret")
