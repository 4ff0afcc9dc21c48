"""Identities: keys, peer IDs, certificates, files (issue 14, item 1)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punch import Identity, PeerVerificationError, peer_id
from punch._identity import certificate_key, check_peer_id, verify_signature


def test_a_peer_id_is_32_base32_characters_of_the_key_hash() -> None:
    identity = Identity.generate()
    assert check_peer_id(identity.peer_id) == identity.peer_id
    assert identity.peer_id == peer_id(identity.public_key)
    assert len(identity.public_key) == 32
    assert Identity.generate().peer_id != identity.peer_id
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id(b"short")


@pytest.mark.parametrize("bad", ["", "A" * 32, "a" * 31, "a" * 33, "0" * 32, "a1" * 16])
def test_malformed_peer_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="peer ID"):
        check_peer_id(bad)


def test_the_certificate_carries_the_key_and_signs_itself() -> None:
    identity = Identity.generate()
    assert certificate_key(identity.certificate) == identity.public_key
    assert len(identity.certificate) < 300


def test_a_certificate_signed_by_another_key_is_refused() -> None:
    owner, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    genuine = x509.load_der_x509_certificate(Identity(owner).certificate)
    cert = (
        x509.CertificateBuilder()
        .subject_name(genuine.subject)
        .issuer_name(genuine.issuer)
        .public_key(owner.public_key())
        .serial_number(1)
        .not_valid_before(genuine.not_valid_before_utc)
        .not_valid_after(genuine.not_valid_after_utc)
        .sign(forger, None)
    )
    with pytest.raises(PeerVerificationError, match="self-signed"):
        certificate_key(cert.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x01", b"x" * 600])
def test_garbage_certificates_are_refused(der: bytes) -> None:
    with pytest.raises(PeerVerificationError):
        certificate_key(der)


def test_signatures_verify_only_for_their_key_and_data() -> None:
    identity, other = Identity.generate(), Identity.generate()
    signature = identity.sign(b"data")
    assert verify_signature(identity.public_key, signature, b"data")
    assert not verify_signature(identity.public_key, signature, b"other data")
    assert not verify_signature(other.public_key, signature, b"data")
    assert not verify_signature(identity.public_key, b"\x00" * 64, b"data")


def test_save_writes_0600_pem_and_load_gives_the_same_identity(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "key.pem"
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Identity.load(path)
    assert (loaded.peer_id, loaded.certificate) == (identity.peer_id, identity.certificate)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert identity.peer_id in repr(identity)
    assert "PRIVATE" not in repr(identity)


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "config" / "punch" / "identity.pem"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id


def test_a_file_that_is_not_an_ed25519_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("not a key")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        Identity.load(path)
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path / "missing.pem")
