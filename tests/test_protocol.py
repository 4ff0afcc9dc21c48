"""The rendezvous wire protocol, with bytes alone (sans-IO)."""

from __future__ import annotations

import json
import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from punch import (
    Allocation,
    Candidate,
    CandidateType,
    Endpoint,
    LocalProtocolError,
    Mapping,
    RemoteProtocolError,
    Role,
)
from punch._nat import NatFacts
from punch._protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Challenge,
    ConnectRequest,
    Error,
    Introduction,
    Keepalive,
    Message,
    Probed,
    Reach,
    Reached,
    Register,
    Registered,
    RendezvousConnection,
    Report,
    Side,
    check_name,
    encode_frame,
)
from tests.helpers import IDENTITY

CERT = IDENTITY.certificate
SIG = bytes(64)  # the protocol checks sizes; the server checks signatures


def reg(name: str, candidates: tuple[Endpoint, ...] = (), token: str | None = None) -> Register:
    return Register(name, CERT, SIG, candidates, token)


def challenged(side: Side) -> RendezvousConnection:
    """A connection past the server's Challenge (sent or received), as every real one is."""
    connection = RendezvousConnection(side)
    if side is Side.CLIENT:
        connection.receive_data(encode_frame(Challenge(bytes(32))))
    else:
        connection.send(Challenge(bytes(32)))
    return connection


INTRO = Introduction(
    peer_name="bob",
    role=Role.INITIATOR,
    attempt_id=bytes(range(16)),
    secret=bytes(range(32)),
    candidates=(
        Candidate(CandidateType.SERVER_REFLEXIVE, Endpoint("203.0.113.12", 40000)),
        Candidate(CandidateType.HOST, Endpoint("10.0.2.2", 40000)),
        Candidate(CandidateType.HOST, Endpoint("2001:db8::1", 40000)),
    ),
    certificate=CERT,
    request_id=7,
)


def registered_pair() -> tuple[RendezvousConnection, RendezvousConnection]:
    client, server = challenged(Side.CLIENT), challenged(Side.SERVER)
    server.receive_data(client.send(reg("alice", (Endpoint("10.0.1.2", 4000),))))
    client.receive_data(server.send(Registered(Endpoint("203.0.113.11", 4000))))
    return client, server


@pytest.mark.parametrize(
    "message",
    [
        ConnectRequest("bob", 0),
        ConnectRequest("b.o_b-1", 2**32 - 1),
        INTRO,
        Introduction("carol", Role.RESPONDER, b"\x01" * 16, b"\x02" * 32, (), CERT),
        Error("unknown-peer", "'bob' is not registered", 3),
        Error("name-taken", "ünïcödé text", None),
    ],
)
def test_every_message_round_trips_byte_by_byte(message: Message) -> None:
    client, server = registered_pair()
    sender, receiver = (client, server) if isinstance(message, ConnectRequest) else (server, client)
    assert trickle(sender, receiver, message) == [message]


def trickle(
    sender: RendezvousConnection, receiver: RendezvousConnection, message: Message
) -> list[Message]:
    """``message`` sent, and received one byte at a time."""
    data = sender.send(message)
    received: list[Message] = []
    for i in range(len(data)):
        received += receiver.receive_data(data[i : i + 1])
    return received


def test_register_and_registered_round_trip() -> None:
    client, server = challenged(Side.CLIENT), challenged(Side.SERVER)
    register = reg("alice", (Endpoint("10.0.1.2", 4000), Endpoint("::1", 4000)))
    assert server.receive_data(client.send(register)) == [register]
    registered = Registered(Endpoint("203.0.113.11", 4000), idle_timeout=10.0)
    assert client.receive_data(server.send(registered)) == [registered]
    assert client.registered
    assert server.registered


def test_several_frames_in_one_read() -> None:
    client, server = registered_pair()
    data = client.send(ConnectRequest("bob", 1)) + client.send(ConnectRequest("carol", 2))
    assert server.receive_data(data) == [ConnectRequest("bob", 1), ConnectRequest("carol", 2)]


def test_4097_byte_frame_is_refused_from_its_header() -> None:
    server = challenged(Side.SERVER)
    header = struct.pack("!cBH", b"P", PROTOCOL_VERSION, MAX_FRAME + 1 - 4)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(header)  # the body never needs to arrive
    assert info.value.code == "frame-too-large"


def test_4096_byte_frame_is_read_in_full_before_judging_its_body() -> None:
    server = challenged(Side.SERVER)
    body = b" " * (MAX_FRAME - 4)
    assert (
        server.receive_data(struct.pack("!cBH", b"P", PROTOCOL_VERSION, len(body)) + body[:-1])
        == []
    )
    with pytest.raises(RemoteProtocolError, match="malformed"):
        server.receive_data(body[-1:])


def test_other_version_is_refused() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        challenged(Side.SERVER).receive_data(b"P\x01\x00\x00")  # version 1: before keys
    assert info.value.code == "bad-version"


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack("!cBH", b"P", PROTOCOL_VERSION, len(body)) + body


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        [1, 2],
        {"type": "nope"},
        {"type": "register", "name": "alice"},
        {"type": "register", "name": "alice", "candidates": [], "extra": 1},
        {"type": "register", "name": "", "candidates": []},
        {"type": "register", "name": "a b", "candidates": []},
        {"type": "register", "name": "a" * 65, "candidates": []},
        {"type": "register", "name": "alice", "candidates": [{"ip": "1.2.3.4", "port": True}]},
        {"type": "register", "name": "alice", "candidates": [{"ip": "1.2.3.4", "port": 70000}]},
        {"type": "register", "name": "alice", "candidates": [{"ip": "example.com", "port": 1}]},
        {"type": "register", "name": "alice", "candidates": [{"ip": "1.2.3.4", "port": 1}] * 9},
        b'{"type": "register", "type": "register", "name": "a", "candidates": []}',
        b'{"type": "register", "name": "a", "candidates": [], "x": NaN}',
    ],
)
def test_malformed_bodies_raise_remote_protocol_error(body: object) -> None:
    with pytest.raises(RemoteProtocolError):
        challenged(Side.SERVER).receive_data(_frame(body))


OBSERVED = {"ip": "203.0.113.11", "port": 4000}


@pytest.mark.parametrize(
    "body",
    [
        {"type": "registered", "observed": OBSERVED},  # no idle timeout: no keepalive pace
        {"type": "registered", "observed": OBSERVED, "idle_timeout": 0.001},  # a keepalive flood
        {"type": "registered", "observed": OBSERVED, "idle_timeout": 1e9},
        {"type": "registered", "observed": OBSERVED, "idle_timeout": "45"},
        {"type": "registered", "observed": OBSERVED, "idle_timeout": True},
    ],
)
def test_a_registered_without_a_sane_idle_timeout_is_refused(body: object) -> None:
    client = challenged(Side.CLIENT)
    client.send(reg("alice"))
    with pytest.raises(RemoteProtocolError):
        client.receive_data(_frame(body))


def test_broken_connection_stays_broken() -> None:
    server = challenged(Side.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError):
        server.receive_data(encode_frame(reg("alice")))


def test_end_of_stream_mid_frame_is_an_error_and_clean_end_is_not() -> None:
    server = challenged(Side.SERVER)
    assert server.receive_data(b"") == []
    server.receive_data(encode_frame(reg("alice"))[:5])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.receive_data(b"")


def test_order_is_enforced_on_receive() -> None:
    with pytest.raises(RemoteProtocolError, match="before registration"):
        challenged(Side.SERVER).receive_data(encode_frame(ConnectRequest("bob", 1)))
    with pytest.raises(RemoteProtocolError, match="not for a server"):
        challenged(Side.SERVER).receive_data(encode_frame(Registered(Endpoint("1.2.3.4", 1))))
    client, server = registered_pair()
    with pytest.raises(RemoteProtocolError, match="only once"):
        server.receive_data(encode_frame(reg("alice")))
    with pytest.raises(RemoteProtocolError, match="Registered must answer"):
        client.receive_data(encode_frame(Registered(Endpoint("1.2.3.4", 1))))


def test_one_keepalive_may_come_first_and_no_more_before_registration() -> None:
    """A client speaks at once (its ACK rides on data); the server still speaks first."""
    client, server = RendezvousConnection(Side.CLIENT), RendezvousConnection(Side.SERVER)
    assert server.receive_data(client.send(Keepalive())) == [Keepalive()]
    with pytest.raises(LocalProtocolError, match="one may come first"):
        client.send(Keepalive())
    with pytest.raises(RemoteProtocolError, match="one may come first"):
        server.receive_data(encode_frame(Keepalive()))
    late = challenged(Side.SERVER)
    late.receive_data(encode_frame(reg("alice")))
    with pytest.raises(RemoteProtocolError, match="one may come first"):
        late.receive_data(encode_frame(Keepalive()))  # between Register and Registered


def test_order_is_enforced_on_send() -> None:
    client = challenged(Side.CLIENT)
    with pytest.raises(LocalProtocolError, match="may not send Registered"):
        client.send(Registered(Endpoint("1.2.3.4", 1)))
    with pytest.raises(LocalProtocolError, match="before registration"):
        client.send(ConnectRequest("bob", 1))
    client.send(reg("alice"))
    with pytest.raises(LocalProtocolError, match="only once"):
        client.send(reg("alice"))
    with pytest.raises(LocalProtocolError, match="before registration"):
        challenged(Side.SERVER).send(INTRO)


def test_message_fields_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="1-64"):
        reg("no spaces")
    with pytest.raises(ValueError, match="at most 8"):
        reg("alice", (Endpoint("10.0.0.1", 1),) * 9)
    with pytest.raises(ValueError, match="32 bytes"):
        Introduction("bob", Role.INITIATOR, b"\x00" * 16, b"short", (), CERT)
    with pytest.raises(ValueError, match="request_id"):
        ConnectRequest("bob", -1)
    assert check_name("A.b_c-9") == "A.b_c-9"
    assert bytes(range(32)).hex() not in repr(INTRO)  # secrets stay out of logs


@given(st.binary(max_size=2 * MAX_FRAME), st.sampled_from(list(Side)))
def test_arbitrary_bytes_raise_only_remote_protocol_error(data: bytes, side: Side) -> None:
    connection = RendezvousConnection(side)
    try:
        connection.receive_data(data)
        connection.receive_data(b"")
    except RemoteProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
field_names = st.sampled_from(
    [
        "type",
        "name",
        "candidates",
        "ip",
        "port",
        "target",
        "request_id",
        "peer_name",
        "role",
        "attempt_id",
        "secret",
        "code",
        "text",
        "observed",
        "nonce",
        "endpoint",
        "reached",
        "outcome",
    ]
)
types = st.sampled_from(
    [
        "challenge",
        "register",
        "registered",
        "connect",
        "introduction",
        "probed",
        "reach",
        "reached",
        "error",
        "x",
    ]
)


@given(types, st.dictionaries(field_names, json_values, max_size=8), st.booleans())
def test_arbitrary_json_frames_raise_only_remote_protocol_error(
    kind: str, fields: dict[str, object], probe: bool
) -> None:
    for side in Side:
        try:
            RendezvousConnection(side, probe=probe).receive_data(_frame({**fields, "type": kind}))
        except RemoteProtocolError:
            pass


def test_the_challenge_comes_first_and_once() -> None:
    with pytest.raises(LocalProtocolError, match="before the server's Challenge"):
        RendezvousConnection(Side.CLIENT).send(reg("alice"))
    with pytest.raises(RemoteProtocolError, match="before the server's Challenge"):
        RendezvousConnection(Side.SERVER).receive_data(encode_frame(reg("alice")))
    client = challenged(Side.CLIENT)
    assert client.challenge == bytes(32)
    with pytest.raises(RemoteProtocolError, match="only once"):
        client.receive_data(encode_frame(Challenge(bytes(32))))
    with pytest.raises(ValueError, match="32 bytes"):
        Challenge(b"short")


def test_a_register_carries_a_bounded_certificate_and_an_exact_signature() -> None:
    with pytest.raises(ValueError, match="certificate"):
        Register("alice", b"", SIG)
    with pytest.raises(ValueError, match="certificate"):
        Register("alice", b"x" * 513, SIG)
    with pytest.raises(ValueError, match="64 bytes"):
        Register("alice", CERT, b"short")
    wire = json.loads(encode_frame(reg("alice"))[4:])
    assert bytes.fromhex(wire["certificate"]) == CERT
    wire["certificate"] = wire["certificate"].upper()  # hex is lowercase, strictly
    with pytest.raises(RemoteProtocolError, match="lowercase hex"):
        challenged(Side.SERVER).receive_data(_frame(wire))


def test_the_challenge_tells_the_observed_endpoint() -> None:
    challenge = Challenge(bytes(32), Endpoint("203.0.113.11", 40000))
    client = RendezvousConnection(Side.CLIENT)
    assert client.receive_data(encode_frame(challenge)) == [challenge]
    assert json.loads(encode_frame(challenge)[4:])["observed"] == {
        "ip": "203.0.113.11",
        "port": 40000,
    }
    wire = json.loads(encode_frame(challenge)[4:])
    del wire["observed"]  # strict: the field is there, null at most
    with pytest.raises(RemoteProtocolError, match="missing field 'observed'"):
        RendezvousConnection(Side.CLIENT).receive_data(_frame(wire))


def probe_pair() -> tuple[RendezvousConnection, RendezvousConnection]:
    return RendezvousConnection(Side.CLIENT, probe=True), RendezvousConnection(
        Side.SERVER, probe=True
    )


def test_the_probe_port_order_round_trips_byte_by_byte() -> None:
    client, server = probe_pair()
    exchange = [
        (server, client, Probed(Endpoint("203.0.113.11", 30001))),
        (client, server, Reach(Endpoint("203.0.113.11", 30002))),
        (server, client, Reached(False, "timed out")),
    ]
    for sender, receiver, message in exchange:
        assert trickle(sender, receiver, message) == [message]


def test_the_probe_port_order_is_enforced_both_ways() -> None:
    client, server = probe_pair()
    with pytest.raises(LocalProtocolError, match="out of the probe port's order"):
        client.send(Reach(Endpoint("203.0.113.11", 1)))  # before Probed
    with pytest.raises(RemoteProtocolError, match="out of the probe port's order"):
        server.receive_data(encode_frame(Reach(Endpoint("203.0.113.11", 1))))
    client, server = probe_pair()
    with pytest.raises(RemoteProtocolError, match="not sent on the probe port"):
        server.receive_data(encode_frame(reg("alice")))
    with pytest.raises(LocalProtocolError, match="not sent on the probe port"):
        RendezvousConnection(Side.SERVER, probe=True).send(Challenge(bytes(32)))
    client, server = probe_pair()
    client.receive_data(server.send(Probed(Endpoint("203.0.113.11", 1))))
    server.receive_data(client.send(Reach(Endpoint("203.0.113.11", 2))))
    with pytest.raises(LocalProtocolError, match="out of the probe port's order"):
        client.send(Reach(Endpoint("203.0.113.11", 2)))  # one Reach only
    assert client.receive_data(server.send(Error("busy", "later"))) == [Error("busy", "later")]
    # and the control connection has none of the probe port's frames
    with pytest.raises(RemoteProtocolError, match="not sent on a control connection"):
        challenged(Side.CLIENT).receive_data(encode_frame(Probed(Endpoint("203.0.113.11", 1))))


def test_a_reached_outcome_is_bounded_text() -> None:
    with pytest.raises(ValueError, match="1-64"):
        Reached(True, "")
    with pytest.raises(ValueError, match="1-64"):
        Reached(True, "x" * 65)
    with pytest.raises(TypeError):
        Reached("yes", "connected")  # type: ignore[arg-type]


FACTS = NatFacts(Mapping.ENDPOINT_DEPENDENT, False, Allocation.SEQUENTIAL, 1, (30000, 30001))


def test_a_report_comes_once_after_registration_and_round_trips() -> None:
    with pytest.raises(LocalProtocolError, match="before registration"):
        challenged(Side.CLIENT).send(Report(FACTS))
    client, server = registered_pair()
    assert trickle(client, server, Report(FACTS)) == [Report(FACTS)]
    with pytest.raises(LocalProtocolError, match="only once"):
        client.send(Report(FACTS))
    with pytest.raises(RemoteProtocolError, match="only once"):
        server.receive_data(encode_frame(Report(FACTS)))
    introduction = attrs.evolve(INTRO, peer_nat=FACTS)
    assert trickle(server, client, introduction) == [introduction]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mapping", "full-cone"),
        ("allocation", "clever"),
        ("step", 65),
        ("step", True),
        ("ports", []),
        ("ports", [0]),
        ("ports", [70000]),
        ("ports", list(range(1, 10))),
        ("port_preserving", "yes"),
    ],
)
def test_a_report_with_impossible_facts_is_refused(field: str, value: object) -> None:
    _, server = registered_pair()
    wire = json.loads(encode_frame(Report(FACTS))[4:])
    wire["nat"][field] = value
    with pytest.raises(RemoteProtocolError):
        server.receive_data(_frame(wire))
