"""Encrypted punched streams, pinned peer IDs, and a rendezvous that lies (issue 14, items 2-4).

The lying rendezvous is the real server whose registry the test rewrites, as an
operator (or whoever took over the server) could: it announces another key for
a peer, or introduces a third host in the peer's place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

import punch
from punch import Endpoint, Identity, NameTaken, PeerStream, PeerVerificationError
from punch._protocol import Challenge, Error, Register, registration_transcript
from punch._server import NameBindings, RendezvousServer
from tests.helpers import raw_client, register


@asynccontextmanager
async def registry(
    bindings: NameBindings | None = None,
) -> AsyncIterator[tuple[Endpoint, RendezvousServer]]:
    server = RendezvousServer(on_loopback=True, bindings=bindings)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        yield Endpoint.from_sockaddr(listeners[0].socket.getsockname()), server
        nursery.cancel_scope.cancel()


async def _accept(host: punch.Host, into: list[PeerStream | OSError]) -> None:
    try:
        into.append(await host.accept())
    except OSError as exc:
        into.append(exc)


async def punched_pair(
    initiator: punch.Host, responder: punch.Host, peer_id: str | None = None
) -> tuple[PeerStream, PeerStream]:
    """``initiator`` connects to ``responder``, which accepts: both streams."""
    accepted: list[PeerStream | OSError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept, responder, accepted)
        stream = await initiator.connect(responder.name, peer_id=peer_id)
    theirs = accepted[0]
    assert isinstance(theirs, PeerStream)
    return stream, theirs


async def test_streams_are_tls_13_and_prove_each_peer_id() -> None:
    alice_id, bob_id = Identity.generate(), Identity.generate()
    async with (
        registry() as (rendezvous, _),
        punch.open_host("alice", rendezvous=rendezvous, identity=alice_id) as alice,
        punch.open_host("bob", rendezvous=rendezvous, identity=bob_id) as bob,
    ):
        stream, theirs = await punched_pair(alice, bob, bob_id.peer_id)
        async with stream, theirs:
            assert stream.encrypted
            assert theirs.encrypted
            assert (stream.peer_id, theirs.peer_id) == (bob_id.peer_id, alice_id.peer_id)
            assert 0 < stream.tls_time <= stream.connect_time
            await stream.send_all(b"secret")
            assert await theirs.receive_some() == b"secret"
            # and on the wire it is not in clear: TLS owns the socket
            assert stream._tls is not None
            assert stream._tls.ssl_object.version() == "TLSv1.3"


async def test_plaintext_when_both_ask_for_it() -> None:
    async with (
        registry() as (rendezvous, _),
        punch.open_host("alice", rendezvous=rendezvous, encrypt=False) as alice,
        punch.open_host("bob", rendezvous=rendezvous, encrypt=False) as bob,
    ):
        stream, theirs = await punched_pair(alice, bob)
        async with stream, theirs:
            assert not stream.encrypted
            assert not theirs.encrypted
            assert stream.peer_id is None
        with pytest.raises(ValueError, match="needs encrypt=True"):
            await alice.connect("bob", peer_id=Identity.generate().peer_id)


async def test_a_host_that_would_not_encrypt_is_refused() -> None:
    async with (
        registry() as (rendezvous, _),
        punch.open_host("alice", rendezvous=rendezvous, timeout=1.0) as alice,
        punch.open_host("bob", rendezvous=rendezvous, timeout=1.0, encrypt=False) as bob,
    ):
        accepted: list[PeerStream | OSError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, bob, accepted)
            with pytest.raises(punch.PunchFailed) as info:
                await alice.connect("bob")
        assert info.value.authentication_failed
        assert isinstance(accepted[0], punch.PunchFailed)
        assert "wants plaintext" in _causes(info.value)


def _causes(exc: BaseException) -> str:
    """Every message in an exception's cause tree, for matching."""
    seen, todo = [], [exc]
    while todo:
        e = todo.pop()
        seen.append(str(e))
        if isinstance(e, BaseExceptionGroup):
            todo += e.exceptions
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return "\n".join(seen)


async def test_a_rendezvous_that_swaps_keys_is_caught_by_tls() -> None:
    """It announces mallory's key for bob: bob's real certificate then fails alice's
    TLS, pinned or not; pinned, alice refuses before any SYN."""
    bob_id, mallory = Identity.generate(), Identity.generate()
    async with (
        registry() as (rendezvous, server),
        punch.open_host("alice", rendezvous=rendezvous, timeout=2.0) as alice,
        punch.open_host("bob", rendezvous=rendezvous, identity=bob_id, timeout=2.0) as bob,
    ):
        server.peers["bob"].certificate = mallory.certificate  # the lie
        accepted: list[PeerStream | OSError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, bob, accepted)
            with pytest.raises(PeerVerificationError, match="not the one it registered"):
                await alice.connect("bob")
        assert isinstance(accepted[0], OSError)  # bob's side fails too: no stream
        started = trio.current_time()
        with pytest.raises(PeerVerificationError, match="not the pinned") as pinned:
            await alice.connect("bob", peer_id=bob_id.peer_id)
        assert (pinned.value.expected, pinned.value.presented) == (bob_id.peer_id, mallory.peer_id)
        assert trio.current_time() - started < 1.0  # no punch was tried


async def test_a_rendezvous_that_introduces_a_third_host_is_caught_by_a_pin() -> None:
    """Asked for bob, it introduces carol under bob's name: TLS works (carol has
    her own key), so only the pinned peer ID tells."""
    bob_id, carol_id = Identity.generate(), Identity.generate()
    async with (
        registry() as (rendezvous, server),
        punch.open_host("alice", rendezvous=rendezvous, timeout=2.0) as alice,
        punch.open_host("bob", rendezvous=rendezvous, identity=bob_id),
        punch.open_host("carol", rendezvous=rendezvous, identity=carol_id) as carol,
    ):
        server.peers["bob"] = attrs.evolve(server.peers["carol"], name="bob")  # the lie
        accepted: list[PeerStream | OSError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, carol, accepted)
            impostor = await alice.connect("bob")  # unpinned: alice cannot tell
        theirs = accepted[0]
        assert isinstance(theirs, PeerStream)
        async with impostor, theirs:
            assert impostor.peer_id == carol_id.peer_id != bob_id.peer_id
        with pytest.raises(PeerVerificationError, match="not the pinned"):
            await alice.connect("bob", peer_id=bob_id.peer_id)
        # carol's key is now one alice's TLS knows; announced as bob's key, carol is
        # still refused: only the introduced certificate itself will do
        server.peers["bob"] = attrs.evolve(server.peers["carol"], certificate=bob_id.certificate)
        server.peers["bob"].name = "bob"
        accepted.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_accept, carol, accepted)
            with pytest.raises(PeerVerificationError, match="not the one it registered"):
                await alice.connect("bob")
        # TLS 1.3's server is done before the client checks: carol holds a stream
        # that alice has already reset
        refused = accepted[0]
        assert isinstance(refused, PeerStream)
        async with refused:
            with pytest.raises(trio.BrokenResourceError):
                await refused.receive_some()


async def test_a_name_is_bound_to_its_key_while_held_and_with_persistence_for_good(
    tmp_path: Path,
) -> None:
    path = tmp_path / "names.jsonl"
    owner, thief = Identity.generate(), Identity.generate()
    async with registry(NameBindings(path)) as (rendezvous, _):
        async with punch.open_host("alice", rendezvous=rendezvous, identity=owner):
            with pytest.raises(NameTaken, match="held by a connected peer"):
                async with punch.open_host("alice", rendezvous=rendezvous, identity=thief):
                    pass
        # the holder left: the name stays the owner's key's
        with pytest.raises(NameTaken, match="bound to another key") as stolen:
            async with punch.open_host("alice", rendezvous=rendezvous, identity=thief):
                pass
        assert stolen.value.code == "name-taken"
        async with punch.open_host("alice", rendezvous=rendezvous, identity=owner) as back:
            assert back.name == "alice"
    # the file outlives the server: a restarted one still knows
    assert NameBindings(path).bound == {"alice": owner.peer_id}
    async with registry(NameBindings(path)) as (rendezvous, _):
        with pytest.raises(NameTaken):
            async with punch.open_host("alice", rendezvous=rendezvous, identity=thief):
                pass


async def test_without_persistence_a_free_name_takes_any_key() -> None:
    async with registry() as (rendezvous, _):
        async with punch.open_host("alice", rendezvous=rendezvous):
            pass
        async with punch.open_host("alice", rendezvous=rendezvous) as again:
            assert again.name == "alice"


def test_a_torn_last_line_is_skipped_and_a_bad_middle_line_is_an_error(tmp_path: Path) -> None:
    key = Identity.generate().peer_id
    path = tmp_path / "names.jsonl"
    path.write_text(f'{{"name": "a", "peer_id": "{key}"}}\n{{"name": "b", "pe')
    assert NameBindings(path).bound == {"a": key}
    NameBindings(path).bind("c", key)  # appends after the cut, not onto the torn line
    assert NameBindings(path).bound == {"a": key, "c": key}
    path.write_text(f'garbage\n{{"name": "a", "peer_id": "{key}"}}\n')
    with pytest.raises(ValueError, match=":1: not a name binding"):
        NameBindings(path)


async def test_a_register_signed_over_another_challenge_is_refused() -> None:
    """A recorded Register cannot be replayed: its signature covers that connection's challenge."""
    identity = Identity.generate()
    async with registry() as (rendezvous, _), raw_client(rendezvous) as client:
        challenge = await client.receive()
        assert isinstance(challenge, Challenge)
        stale = registration_transcript(b"\x00" * 32, "alice")
        await client.send(Register("alice", identity.certificate, identity.sign(stale)))
        reply = await client.receive()
        assert isinstance(reply, Error)
        assert reply.code == "bad-signature"


async def test_a_register_with_a_certificate_of_another_key_is_refused() -> None:
    identity, other = Identity.generate(), Identity.generate()
    async with registry() as (rendezvous, _), raw_client(rendezvous) as client:
        challenge = await client.receive()
        assert isinstance(challenge, Challenge)
        signature = identity.sign(registration_transcript(challenge.nonce, "alice"))
        await client.send(Register("alice", other.certificate, signature))
        reply = await client.receive()
        assert isinstance(reply, Error)
        assert reply.code == "bad-signature"
    async with registry() as (rendezvous, _), raw_client(rendezvous) as client:
        assert not isinstance(await register(client, "alice", identity=identity), Error)
