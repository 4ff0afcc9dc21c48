"""The peer handshake, driven with bytes alone (sans-IO)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punch import HandshakeError, PeerVerificationError, Role
from punch._handshake import (
    HELLO_SIZE,
    MAX_CLIENT_HELLO,
    NOMINATION_SIZE,
    PROOF_SIZE,
    VERSION,
    Handshake,
    Stage,
    parse_hello,
)


def pair() -> tuple[Handshake, Handshake]:
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)
    return Handshake(Role.INITIATOR, attempt, secret), Handshake(Role.RESPONDER, attempt, secret)


def proof_of(responder: Handshake) -> bytes:
    """The Proof in the responder's opening."""
    return responder.opening()[HELLO_SIZE:]


def run(initiator: Handshake, responder: Handshake) -> bytes:
    """Both openings cross at once; returns the Nomination the responder took."""
    responder.receive(initiator.opening())
    initiator.receive(responder.hello())
    initiator.receive(proof_of(responder))
    nomination = initiator.nominate()
    responder.receive(nomination)
    return nomination


def test_the_responder_proves_in_its_opening_and_the_initiator_nominates_on_reading_it() -> None:
    """Neither side waits for the other before speaking: the responder's Proof leaves
    with its Hello, so the initiator can nominate after one message from the peer."""
    initiator, responder = pair()
    assert initiator.opening() == initiator.hello()
    assert len(initiator.opening()) == HELLO_SIZE
    opening = responder.opening()
    assert len(opening) == HELLO_SIZE + PROOF_SIZE
    assert opening[:HELLO_SIZE] == responder.hello()
    assert (initiator.expecting, responder.expecting) == (HELLO_SIZE, HELLO_SIZE)
    initiator.receive(opening[:HELLO_SIZE])  # the responder's opening, read first
    assert initiator.expecting == PROOF_SIZE
    initiator.receive(opening[HELLO_SIZE:])
    assert initiator.stage is Stage.AUTHENTICATED
    assert initiator.expecting == 0
    nomination = initiator.nominate()
    assert len(nomination) == NOMINATION_SIZE
    assert initiator.stage is Stage.NOMINATED
    responder.receive(initiator.opening())  # the initiator's Hello, read late: no matter
    assert responder.stage is Stage.NOMINATION
    assert responder.expecting == NOMINATION_SIZE
    responder.receive(nomination)
    assert responder.stage is Stage.NOMINATED
    assert responder.expecting == 0


def test_wrong_secret_is_rejected_both_ways() -> None:
    initiator, responder = pair()
    stranger = Handshake(Role.RESPONDER, responder.attempt_id, secrets.token_bytes(32))
    initiator.receive(stranger.hello())
    with pytest.raises(HandshakeError, match="proof does not match"):
        initiator.receive(proof_of(stranger))
    impostor = Handshake(Role.INITIATOR, responder.attempt_id, secrets.token_bytes(32))
    responder.receive(impostor.hello())
    impostor.stage = Stage.AUTHENTICATED  # as if it ignored the proof it cannot check
    impostor.peer_nonce = responder.nonce
    with pytest.raises(HandshakeError, match="nomination does not match"):
        responder.receive(impostor.nominate())


def test_own_nonce_echoed_back_is_a_self_connect() -> None:
    initiator, _ = pair()
    with pytest.raises(HandshakeError, match="own nonce"):
        initiator.receive(initiator.hello())


def test_role_claim_must_oppose_ours() -> None:
    initiator, _ = pair()
    other_initiator = Handshake(Role.INITIATOR, initiator.attempt_id, initiator.secret)
    with pytest.raises(HandshakeError, match="claims role initiator"):
        initiator.receive(other_initiator.hello())


def test_hello_for_another_attempt_is_rejected() -> None:
    initiator, _ = pair()
    foreign = Handshake(Role.RESPONDER, secrets.token_bytes(16), initiator.secret)
    with pytest.raises(HandshakeError, match="another punch attempt"):
        initiator.receive(foreign.hello())


def test_a_proof_from_another_attempt_is_rejected_even_with_its_hello() -> None:
    """A responder's whole opening recorded in one attempt, replayed in the next
    between the same peers (same nonce, same role): the attempt id differs."""
    initiator, _ = pair()
    earlier = Handshake(Role.RESPONDER, secrets.token_bytes(16), secrets.token_bytes(32))
    forged = Handshake(Role.RESPONDER, initiator.attempt_id, initiator.secret, nonce=earlier.nonce)
    initiator.receive(forged.hello())  # the Hello names this attempt; its MAC cannot
    with pytest.raises(HandshakeError, match="proof does not match"):
        initiator.receive(proof_of(earlier))


def test_a_proof_replayed_within_its_attempt_verifies_but_wins_no_nomination_back() -> None:
    """As the module says: the Proof binds the responder's nonce, not the initiator's,
    so a responder's opening recorded on one connection of this attempt verifies on
    another; the Nomination that the replayed connection then gets binds the
    initiator's nonce of that connection, and the real responder, on its own
    connection, refuses it."""
    initiator, responder = pair()
    recorded = responder.opening()
    again = Handshake(Role.INITIATOR, initiator.attempt_id, initiator.secret)
    again.receive(recorded[:HELLO_SIZE])
    again.receive(recorded[HELLO_SIZE:])
    assert again.stage is Stage.AUTHENTICATED
    nomination = again.nominate()
    responder.receive(initiator.hello())
    with pytest.raises(HandshakeError, match="nomination does not match"):
        responder.receive(nomination)


def test_a_nomination_replayed_on_another_connection_is_rejected() -> None:
    initiator, responder = pair()
    recorded = run(initiator, responder)
    other = Handshake(Role.RESPONDER, responder.attempt_id, responder.secret)
    replayer = Handshake(
        Role.INITIATOR, initiator.attempt_id, initiator.secret, nonce=initiator.nonce
    )
    other.receive(replayer.hello())  # the recorded Hello, then the recorded Nomination
    with pytest.raises(HandshakeError, match="nomination does not match"):
        other.receive(recorded)


def test_a_mac_reflected_at_its_author_is_rejected() -> None:
    initiator, responder = pair()
    initiator.receive(responder.hello())
    # what the initiator's Nomination will carry for these nonces, sent back as the Proof
    own = initiator._mac(Role.INITIATOR)
    with pytest.raises(HandshakeError, match="proof does not match"):
        initiator.receive(own)
    # and the responder's own Proof sent back to it as a Nomination
    responder.receive(initiator.hello())
    with pytest.raises(HandshakeError, match="nomination does not match"):
        responder.receive(b"N" + proof_of(responder))


def test_messages_out_of_turn_are_errors() -> None:
    initiator, responder = pair()
    with pytest.raises(HandshakeError, match="cannot nominate"):
        initiator.nominate()  # before the responder's proof
    with pytest.raises(HandshakeError, match="cannot nominate"):
        responder.nominate()  # never the responder's to do
    run(initiator, responder)
    with pytest.raises(HandshakeError, match="expected 0"):
        responder.receive(b"N")  # nothing is due once nominated
    with pytest.raises(HandshakeError, match=f"expected {HELLO_SIZE}"):
        pair()[0].receive(b"short")


def test_garbage_instead_of_a_nomination() -> None:
    initiator, responder = pair()
    responder.receive(initiator.opening())
    with pytest.raises(HandshakeError, match="garbage instead of a nomination"):
        responder.receive(b"X" * NOMINATION_SIZE)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PNCH",
        b"XXXX" + bytes(HELLO_SIZE - 4),
        b"PNCH" + bytes([VERSION + 1, 1]) + bytes(33),
        b"PNCH" + bytes([VERSION, 7]) + bytes(33),
        b"PNCH" + bytes([VERSION, 1]) + bytes(32) + b"\x80",  # a flag we do not know
    ],
)
def test_bad_hellos(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        parse_hello(data)


@given(st.binary(min_size=HELLO_SIZE, max_size=HELLO_SIZE), st.sampled_from(list(Role)))
def test_arbitrary_hello_bytes_raise_only_handshake_error(data: bytes, role: Role) -> None:
    shake = pair()[0 if role is Role.INITIATOR else 1]
    try:
        shake.receive(data)
    except HandshakeError:
        pass


@given(st.binary(min_size=NOMINATION_SIZE, max_size=NOMINATION_SIZE))
def test_arbitrary_nomination_bytes_never_nominate(data: bytes) -> None:
    initiator, responder = pair()
    responder.receive(initiator.hello())
    with pytest.raises(HandshakeError):
        responder.receive(data)


@pytest.mark.parametrize("initiator_encrypts", [True, False])
def test_sides_that_disagree_on_encryption_refuse_each_other(initiator_encrypts: bool) -> None:
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)
    initiator = Handshake(Role.INITIATOR, attempt, secret, encrypt=initiator_encrypts)
    responder = Handshake(Role.RESPONDER, attempt, secret, encrypt=not initiator_encrypts)
    with pytest.raises(PeerVerificationError, match="refused"):
        responder.receive(initiator.hello())
    with pytest.raises(PeerVerificationError, match="refused"):
        initiator.receive(responder.hello())


def test_a_downgrade_on_the_path_is_refused() -> None:
    """Someone on the path clears the TLS flag of both Hellos: each side sees a
    peer that wants plaintext, and neither gives up TLS."""
    initiator, responder = pair()
    hello_i, hello_r = bytearray(initiator.hello()), bytearray(responder.hello())
    hello_i[-1] = hello_r[-1] = 0
    with pytest.raises(PeerVerificationError, match="wants plaintext"):
        responder.receive(bytes(hello_i))
    with pytest.raises(PeerVerificationError, match="wants plaintext"):
        initiator.receive(bytes(hello_r))


def test_plaintext_sides_agree_and_their_macs_differ_from_encrypting_ones() -> None:
    attempt, secret = secrets.token_bytes(16), secrets.token_bytes(32)
    nonces = secrets.token_bytes(16), secrets.token_bytes(16)
    proofs = []
    for encrypt in (False, True):
        initiator = Handshake(Role.INITIATOR, attempt, secret, nonces[0], encrypt=encrypt)
        responder = Handshake(Role.RESPONDER, attempt, secret, nonces[1], encrypt=encrypt)
        responder.receive(initiator.opening())
        proofs.append(proof_of(responder))
        initiator.receive(responder.hello())
        initiator.receive(proofs[-1])
        assert initiator.stage is Stage.AUTHENTICATED
    assert proofs[0] != proofs[1]  # the MAC covers the flags: a Proof does not cross over


CLIENT_HELLO = b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"  # shaped as a record; never parsed here


def test_the_client_hello_follows_the_initiators_hello_and_the_responder_reads_it() -> None:
    """Hello, the ClientHello's length, the ClientHello; the responder holds it for
    TLS before the Nomination, which still verifies (the MACs cover encryption only)."""
    initiator, responder = pair()
    opening = initiator.opening(CLIENT_HELLO)
    assert len(opening) == HELLO_SIZE + 2 + len(CLIENT_HELLO)
    assert parse_hello(opening[:HELLO_SIZE]).client_hello_follows
    assert not parse_hello(initiator.opening()).client_hello_follows
    responder.receive(opening[:HELLO_SIZE])
    assert (responder.stage, responder.expecting) == (Stage.CLIENT_HELLO_SIZE, 2)
    responder.receive(opening[HELLO_SIZE : HELLO_SIZE + 2])
    assert (responder.stage, responder.expecting) == (Stage.CLIENT_HELLO, len(CLIENT_HELLO))
    assert responder.client_hello is None
    responder.receive(opening[HELLO_SIZE + 2 :])
    assert responder.client_hello == CLIENT_HELLO
    assert (responder.stage, responder.expecting) == (Stage.NOMINATION, NOMINATION_SIZE)
    initiator.receive(responder.hello())
    initiator.receive(proof_of(responder))
    responder.receive(initiator.nominate())
    assert responder.stage is Stage.NOMINATED


def test_a_client_hello_only_from_an_initiator_that_encrypts_and_within_one_record() -> None:
    initiator, responder = pair()
    with pytest.raises(HandshakeError, match="TLS server"):
        responder.opening(CLIENT_HELLO)
    with pytest.raises(HandshakeError, match="ClientHello"):
        initiator.opening(b"x" * (MAX_CLIENT_HELLO + 1))
    plaintext = Handshake(Role.INITIATOR, initiator.attempt_id, initiator.secret, encrypt=False)
    with pytest.raises(HandshakeError, match="encrypt=False"):
        plaintext.opening(CLIENT_HELLO)
    assert len(initiator.opening(b"x" * MAX_CLIENT_HELLO)) == HELLO_SIZE + 2 + MAX_CLIENT_HELLO


@pytest.mark.parametrize("size", [0, MAX_CLIENT_HELLO + 1])
def test_a_client_hello_length_out_of_range_is_refused(size: int) -> None:
    initiator, responder = pair()
    responder.receive(initiator.opening(CLIENT_HELLO)[:HELLO_SIZE])
    with pytest.raises(HandshakeError, match=f"ClientHello of {size} bytes"):
        responder.receive(size.to_bytes(2, "big"))


def test_a_client_hello_announced_by_the_responder_or_without_encryption_is_refused() -> None:
    initiator, responder = pair()
    hello = bytearray(responder.hello())
    hello[-1] |= 0x02  # the responder claims a ClientHello follows
    with pytest.raises(HandshakeError, match="TLS server"):
        initiator.receive(bytes(hello))
    hello[-1] = 0x02  # a ClientHello, but no encryption
    with pytest.raises(HandshakeError, match="unknown flags"):
        parse_hello(bytes(hello))
