"""Peer identities: an Ed25519 key pair per host, its self-signed certificate and peer ID.

Everything cryptographic comes from the ``cryptography`` package (keys,
signatures, X.509) and the stdlib ``ssl`` module (TLS); nothing is written by
hand here.

A peer ID is the lowercase RFC 4648 §6 base32 text, without padding, of the
first 20 bytes of SHA-256 over the 32-byte raw Ed25519 public key (RFC 8032
§5.1.5): 32 characters of ``[a-z2-7]``, like ``"k2v7...q4"`` (160 bits, as a
Bitcoin or Ethereum address; libp2p's peer IDs hash the key the same way).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import ssl
import tempfile
import threading
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ._errors import PeerVerificationError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_LENGTH = 32
"""Characters of a peer ID (20 bytes of SHA-256 in base32)."""
_PEER_ID_RE = re.compile(f"[a-z2-7]{{{PEER_ID_LENGTH}}}")
MAX_CERTIFICATE = 512
"""Bytes (DER) a peer's certificate may take; ours take 209."""
TRUSTED_PER_CONTEXT = 1024
"""Peer certificates one cached TLS context trusts before it is built anew."""
# Fixed fields make the certificate a pure function of the key: the same key
# always gives the same certificate (Ed25519 signatures are deterministic).
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id(public_key: bytes) -> str:
    """The peer ID of a 32-byte raw Ed25519 public key (see the module docstring).

    Raises:
        ValueError: ``public_key`` is not 32 bytes.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(public_key)}"
        )
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode().lower()


def check_peer_id(value: str) -> str:
    """Check a peer ID's form: 32 characters of ``[a-z2-7]``.

    Raises:
        TypeError: not a ``str``.
        ValueError: any other form.
    """
    if not isinstance(value, str):
        raise TypeError(f"peer_id must be str, not {value!r}")
    if not _PEER_ID_RE.fullmatch(value):
        raise ValueError(f"a peer ID is {PEER_ID_LENGTH} characters of [a-z2-7], not {value!r}")
    return value


def certificate_key(der: bytes) -> bytes:
    """The raw Ed25519 public key of a peer's self-signed certificate, once checked.

    Args:
        der: an X.509 certificate, DER, at most :data:`MAX_CERTIFICATE` bytes.

    Returns:
        the 32-byte public key it carries.

    Raises:
        PeerVerificationError: too large, not DER X.509, not an Ed25519 key,
            or not signed by its own key.
    """
    if not isinstance(der, bytes) or len(der) > MAX_CERTIFICATE:
        raise PeerVerificationError(f"a peer certificate is at most {MAX_CERTIFICATE} bytes")
    try:
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise PeerVerificationError("the peer certificate's key is not Ed25519")
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PeerVerificationError(f"not a self-signed Ed25519 certificate: {exc}") from exc
    return _raw(key)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Does ``signature`` (64 bytes) sign ``data`` under the raw Ed25519 ``public_key``?"""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@attrs.frozen(repr=False)
class Identity:
    """An Ed25519 key pair (RFC 8032) that names one host; made by :meth:`generate` or :meth:`load`.

    Attributes:
        public_key: the 32-byte raw public key.
        peer_id: its printable peer ID (:func:`peer_id`).
        certificate: the self-signed X.509 certificate (DER) for the key, the
            one presented in TLS and registered at the rendezvous.
    """

    _private_key: Ed25519PrivateKey = attrs.field(alias="private_key")
    public_key: bytes = attrs.field(init=False)
    peer_id: str = attrs.field(init=False)
    certificate: bytes = attrs.field(init=False)
    _contexts: dict[bool, tuple[ssl.SSLContext, set[bytes]]] = attrs.field(
        factory=dict, init=False, eq=False
    )
    _contexts_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        raw = _raw(self._private_key.public_key())
        printable = peer_id(raw)
        # Subject and issuer name the peer ID: OpenSSL finds trust anchors by name,
        # so a context trusting several peers must see a distinct name for each
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, printable)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._private_key.public_key())
            .serial_number(1)
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_AFTER)
            .sign(self._private_key, None)
        )
        object.__setattr__(self, "public_key", raw)
        object.__setattr__(self, "peer_id", printable)
        object.__setattr__(self, "certificate", cert.public_bytes(serialization.Encoding.DER))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        """A new random key pair (from the OS's CSPRNG, through ``cryptography``)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a PEM file written by :meth:`save` (PKCS #8, unencrypted).

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not an unencrypted PEM Ed25519 private key.
        """
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PEM (PKCS #8), mode ``0600``, atomically.

        The file is created beside ``path`` with ``0600`` from the start, then
        renamed over it, so no reader ever sees a partial or world-readable key.

        Raises:
            OSError: the directory cannot be written.
        """
        target = Path(path)
        pem = self._private_pem()
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".identity-")
        try:  # mkstemp creates it 0600 (tempfile docs)
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """:meth:`load` the file, or :meth:`generate` one and :meth:`save` it there
        (creating its directory, ``0700``) when it does not exist.

        Raises:
            OSError, ValueError: as :meth:`load` and :meth:`save`.
        """
        target = Path(path)
        if target.exists():
            return cls.load(target)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = cls.generate()
        identity.save(target)
        return identity

    def _private_pem(self) -> bytes:
        """The private key as unencrypted PEM PKCS #8 (RFC 5958)."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def tls_context(self, peer_certificate: bytes, *, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that presents our certificate and trusts the peer's.

        Both sides require a certificate (the responder asks the initiator for
        one), and OpenSSL accepts only self-signed certificates it was given
        as trust anchors: the peer's, and those of peers introduced to us
        before (one context per side is kept and reused, so a punch does not
        pay the 3-7 ms of building one, only about 0.2 ms to add the peer's
        certificate; it is built anew after :data:`TRUSTED_PER_CONTEXT`
        peers). The caller must therefore check that the certificate the peer
        presented is exactly ``peer_certificate`` (``_secure.encrypt`` does).
        No hostname (peers have none), no session tickets (a punched stream is
        never resumed). Thread-safe (:meth:`prepare_tls` runs in a worker
        thread).

        Args:
            peer_certificate: the DER certificate the peer registered (from the
                introduction).
            server_side: we are the TLS server (the responder).

        Raises:
            ssl.SSLError: OpenSSL cannot load ``peer_certificate``.
        """
        with self._contexts_lock:
            context, trusted = self._context(server_side)
            if peer_certificate not in trusted:
                context.load_verify_locations(cadata=peer_certificate)
                trusted.add(peer_certificate)
            return context

    def prepare_tls(self) -> None:
        """Build both sides' TLS contexts now, so that no punch waits for one.

        :func:`~punch.open_host` calls it in a worker thread as the host opens
        (OpenSSL releases the GIL while it loads the key): a first context
        costs 3-7 ms of CPU, which the initiator would otherwise spend
        between the peer's Proof and its Nomination, and the responder
        before its ServerHello. Thread-safe; a context already built is kept.

        Raises:
            ssl.SSLError, OSError: OpenSSL or the temporary key file failed.
        """
        for server_side in (False, True):
            with self._contexts_lock:
                self._context(server_side)

    def _context(self, server_side: bool) -> tuple[ssl.SSLContext, set[bytes]]:
        """The cached context of one side and the certificates it trusts (lock held)."""
        cached = self._contexts.get(server_side)
        if cached is None or len(cached[1]) >= TRUSTED_PER_CONTEXT:
            cached = self._contexts[server_side] = (self._new_context(server_side), set())
        return cached

    def _new_context(self, server_side: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        if server_side:
            context.num_tickets = 0
        pem = self._private_pem() + ssl.DER_cert_to_PEM_cert(self.certificate).encode()
        # load_cert_chain reads only files: a private 0700 directory, gone at once
        with tempfile.TemporaryDirectory(prefix="punch-tls-") as directory:
            chain = Path(directory, "chain.pem")
            chain.touch(mode=0o600)
            chain.write_bytes(pem)
            context.load_cert_chain(chain)
        return context
