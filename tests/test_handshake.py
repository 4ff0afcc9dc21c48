"""The peer handshake, with bytes alone (sans-IO)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punch import HandshakeError, Role
from punch._handshake import HELLO_SIZE, Handshake, parse_hello


def pair() -> tuple[Handshake, Handshake]:
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)
    return Handshake(Role.INITIATOR, attempt, secret), Handshake(Role.RESPONDER, attempt, secret)


def test_both_sides_authenticate() -> None:
    initiator, responder = pair()
    initiator.receive_hello(responder.hello())
    responder.receive_hello(initiator.hello())
    initiator.verify_proof(responder.proof())
    responder.verify_proof(initiator.proof())
    assert initiator.proof() != responder.proof()


def test_wrong_secret_is_rejected() -> None:
    initiator, responder = pair()
    stranger = Handshake(Role.RESPONDER, responder.attempt_id, secrets.token_bytes(32))
    initiator.receive_hello(stranger.hello())
    stranger.receive_hello(initiator.hello())
    with pytest.raises(HandshakeError, match="does not match"):
        initiator.verify_proof(stranger.proof())


def test_own_nonce_echoed_back_is_a_self_connect() -> None:
    initiator, _ = pair()
    with pytest.raises(HandshakeError, match="own nonce"):
        initiator.receive_hello(initiator.hello())


def test_role_claim_must_oppose_ours() -> None:
    initiator, _ = pair()
    other_initiator = Handshake(Role.INITIATOR, initiator.attempt_id, initiator.secret)
    with pytest.raises(HandshakeError, match="claims role initiator"):
        initiator.receive_hello(other_initiator.hello())


def test_hello_for_another_attempt_is_rejected() -> None:
    initiator, _ = pair()
    foreign = Handshake(Role.RESPONDER, secrets.token_bytes(16), initiator.secret)
    with pytest.raises(HandshakeError, match="another punch attempt"):
        initiator.receive_hello(foreign.hello())


def test_replayed_proof_from_an_earlier_exchange_is_rejected() -> None:
    initiator, responder = pair()
    initiator.receive_hello(responder.hello())
    responder.receive_hello(initiator.hello())
    recorded = responder.proof()
    # same attempt and secret, fresh nonces: the old proof no longer fits
    again = Handshake(Role.INITIATOR, initiator.attempt_id, initiator.secret)
    replayer = Handshake(
        Role.RESPONDER, initiator.attempt_id, initiator.secret, nonce=responder.nonce
    )
    again.receive_hello(replayer.hello())
    with pytest.raises(HandshakeError):
        again.verify_proof(recorded)


def test_reflected_proof_is_rejected() -> None:
    initiator, responder = pair()
    initiator.receive_hello(responder.hello())
    with pytest.raises(HandshakeError):
        initiator.verify_proof(initiator.proof())


def test_proof_before_hello_is_an_error() -> None:
    initiator, _ = pair()
    with pytest.raises(HandshakeError, match="no hello"):
        initiator.proof()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PNCH",
        b"XXXX" + bytes(HELLO_SIZE - 4),
        b"PNCH\x02\x01" + bytes(32),
        b"PNCH\x01\x07" + bytes(32),
    ],
)
def test_bad_hellos(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        parse_hello(data)


@given(st.binary(max_size=2 * HELLO_SIZE))
def test_arbitrary_hello_bytes_raise_only_handshake_error(data: bytes) -> None:
    initiator, _ = pair()
    try:
        initiator.receive_hello(data)
    except HandshakeError:
        pass
