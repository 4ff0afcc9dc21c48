"""The rendezvous wire protocol, sans-IO (h11 is the model): bytes in, messages out.

Nothing here imports trio or touches a socket; the server and the host only
move bytes through a :class:`RendezvousConnection`.

Framing: every frame is a 4-byte header, ``b"P"``, the protocol version
(:data:`PROTOCOL_VERSION`), and the body length as a big-endian u16, followed by
a UTF-8 JSON object body. A whole frame is at most :data:`MAX_FRAME` bytes
(4 KiB, the bound libp2p DCUtR uses). Decoding is strict: an unknown type, a
missing or extra field, a wrong JSON type, a duplicate key, a value out of
range, or a frame sent out of order raises :class:`RemoteProtocolError`.

Order (client = a punch host, server = the rendezvous):

- server → client: ``Challenge`` once, first, as soon as the connection is up;
  ``Registered`` once, answering ``Register``; then ``Introduction``; ``Error``
  at any time.
- client → server: one ``Keepalive`` first, at once, not waiting for the
  ``Challenge`` (optional; see below); ``Register`` once, after the
  ``Challenge``, signed over it with the client's key (the name is bound to
  that key); then any number of ``ConnectRequest`` and ``Keepalive`` once
  ``Registered`` has arrived, and at most one ``Report`` (its NAT's facts,
  measured on the probe port meanwhile; later introductions carry them).

Why the early ``Keepalive``: the server speaks first, so a client that sent
nothing leaves the last ACK of the TCP handshake, if lost, to the server's
SYN-ACK retransmissions, which Linux backs off (1, 2, 4 s) and
``TCP_RTO_MAX_MS`` does not bound; a data segment is retransmitted by the
client, at most a second apart. (The 20% loss cell of the lab lost two
registrations in twenty to this.)

The relay port (``punch-rendezvous --relay``, issue 17) speaks a third, for
one relayed stream (:mod:`punch._relay`):

- client → server: ``Bind`` once, first: the attempt, our role, and a proof
  of the introduction's :class:`RelayGrant` key.
- server → client: ``Bound`` once, when the other role has bound too; from
  then on the connection carries the two peers' bytes and no frame. ``Error``
  instead, then a close.

The probe port (``punch serve --probe-port``, issue 16) speaks a second,
shorter order on the same framing, for :func:`punch.natcheck`:

- server → client: ``Probed`` once, first, as soon as the connection is up;
  then ``Reached`` once, answering ``Reach``; ``Error`` at any time.
- client → server: at most one ``Reach``, after ``Probed``.

Bytes (attempt ids, secrets, nonces, certificates, signatures) travel as
lowercase hex strings.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import attrs

from ._endpoint import Candidate, CandidateType, Endpoint, Role
from ._errors import LocalProtocolError, RemoteProtocolError
from ._identity import MAX_CERTIFICATE, SIGNATURE_BYTES
from ._nat import Allocation, Mapping, NatFacts

PROTOCOL_VERSION = 4
"""2 since issue 14: the server's Challenge, signed Registers, keys in introductions;
3 since issue 16: the Challenge tells the observed endpoint, and the probe port's frames."""
MAX_FRAME = 4096
"""Largest frame in bytes, header included."""
_HEADER = struct.Struct("!cBH")
_MAGIC = b"P"
MAX_BODY = MAX_FRAME - _HEADER.size
MIN_FRAME = 2048
"""The smallest ``max_frame`` allowed: a Register with 8 IPv6 candidates, a token,
a certificate and a signature fits."""
MAX_CANDIDATES = 8
"""Most host candidates a peer may register (RFC 8445 §19 asks for a bound)."""
SECRET_BYTES = 32
ATTEMPT_ID_BYTES = 16
CHALLENGE_BYTES = 32
MAX_REQUEST_ID = 2**32 - 1
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CODE_RE = re.compile(r"[a-z][a-z-]{0,31}")
MAX_ERROR_TEXT = 512
MAX_TOKEN = 256


def introduction_candidates(
    server_reflexive: Iterable[Endpoint], hosts: Iterable[Endpoint]
) -> tuple[Candidate, ...]:
    """A peer's candidates in an introduction: its server-reflexive endpoints
    first (one per registration), then its host candidates; duplicates dropped,
    at most ``MAX_CANDIDATES + 1`` (what an :class:`Introduction` holds)."""
    srflx = [Candidate(CandidateType.SERVER_REFLEXIVE, e) for e in server_reflexive]
    local = [Candidate(CandidateType.HOST, e) for e in hosts]
    return tuple(dict.fromkeys([*srflx, *local]))[: MAX_CANDIDATES + 1]


def check_name(name: str) -> str:
    """Check a peer name: 1 to 64 characters of ``[A-Za-z0-9._-]``.

    Raises:
        TypeError: not a ``str``.
        ValueError: empty, too long or with another character.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {name!r}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"name must be 1-64 characters of [A-Za-z0-9._-], not {name!r}")
    return name


def _name(_: object, __: object, value: str) -> None:
    check_name(value)


def _request_id(_: object, __: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"request_id must be int, not {value!r}")
    if not 0 <= value <= MAX_REQUEST_ID:
        raise ValueError(f"request_id must be in 0..2**32-1, not {value!r}")


_optional_request_id = attrs.validators.optional(_request_id)


def _exact_bytes(size: int) -> Callable[[object, object, bytes], None]:
    def check(_: object, attribute: Any, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes, not {value!r}")

    return check


def _bounded_tuple(kind: type, most: int) -> Callable[[object, object, tuple[Any, ...]], None]:
    def check(_: object, attribute: Any, value: tuple[Any, ...]) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, kind) for v in value):
            raise TypeError(f"{attribute.name} must be a tuple of {kind.__name__}, not {value!r}")
        if len(value) > most:
            raise ValueError(f"{attribute.name}: at most {most}, got {len(value)}")

    return check


def _certificate(_: object, attribute: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_CERTIFICATE:
        raise ValueError(f"{attribute.name} must be 1-{MAX_CERTIFICATE} bytes of DER")


def registration_transcript(challenge: bytes, name: str) -> bytes:
    """What a Register's signature signs: a context string, the server's challenge, the name.

    The challenge is fresh per connection, so a recorded Register cannot be
    replayed to take the name elsewhere (or later).
    """
    return b"punch-register-v2\x00" + challenge + name.encode()


_optional_endpoint = attrs.validators.optional(attrs.validators.instance_of(Endpoint))


@attrs.frozen
class Challenge:
    """server → client, first: 32 fresh random bytes the Register must sign, and
    the client's endpoint as the server sees it (``None`` only from a test):
    what a STUN Binding response tells (RFC 8489 §14.2), before any Register."""

    nonce: bytes = attrs.field(validator=_exact_bytes(CHALLENGE_BYTES), repr=lambda b: b.hex())
    observed: Endpoint | None = attrs.field(default=None, validator=_optional_endpoint)


def _token(_: object, __: object, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_TOKEN):
        raise ValueError(f"token must be 1-{MAX_TOKEN} characters")


@attrs.frozen
class Register:
    """client → server: take ``name`` for our key, and offer these host candidates.

    Args:
        name: 1-64 characters of ``[A-Za-z0-9._-]``.
        certificate: our self-signed Ed25519 certificate, DER (at most
            :data:`~punch._identity.MAX_CERTIFICATE` bytes); peers get it in
            their introductions and accept only it in TLS.
        signature: 64 bytes, Ed25519 over :func:`registration_transcript`
            of the server's Challenge and ``name``.
        candidates: at most :data:`MAX_CANDIDATES` host endpoints.
        token: the server's access token, if it requires one (1-256 characters).
    """

    name: str = attrs.field(validator=_name)
    certificate: bytes = attrs.field(validator=_certificate, repr=False)
    signature: bytes = attrs.field(validator=_exact_bytes(SIGNATURE_BYTES), repr=False)
    candidates: tuple[Endpoint, ...] = attrs.field(
        default=(), validator=_bounded_tuple(Endpoint, MAX_CANDIDATES)
    )
    token: str | None = attrs.field(default=None, validator=_token, repr=lambda _: "<token>")


@attrs.frozen
class Keepalive:
    """client → server, after registration: "still here" (RFC 7675 consent, in spirit);
    also once, first, before the Challenge (see the module's Order)."""


MIN_IDLE_TIMEOUT = 3.0
"""Seconds: the shortest idle timeout a server may announce; clients keep
alive at a third of it, so never more than one Keepalive a second."""
MAX_IDLE_TIMEOUT = 86400.0
"""Seconds: the longest (a day)."""
DEFAULT_IDLE_TIMEOUT = 45.0
"""Seconds: RFC 7675's 30 s consent expiry plus room for one lost keepalive."""


def check_idle_timeout(_: object, __: object, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"idle_timeout must be seconds, not {value!r}")
    if not MIN_IDLE_TIMEOUT <= value <= MAX_IDLE_TIMEOUT:
        raise ValueError(
            f"idle_timeout must be {MIN_IDLE_TIMEOUT:g}..{MAX_IDLE_TIMEOUT:g} s, not {value!r}"
        )


@attrs.frozen
class Registered:
    """server → client: the name is yours; ``observed`` is your server-reflexive endpoint.

    Args:
        observed: the client's endpoint as the server's socket sees it.
        idle_timeout: seconds (:data:`MIN_IDLE_TIMEOUT`..:data:`MAX_IDLE_TIMEOUT`)
            the server lets a registered client stay silent; the client sends
            a Keepalive every third of it.
    """

    observed: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))
    idle_timeout: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT, validator=check_idle_timeout)


_optional_attempt_id = attrs.validators.optional(_exact_bytes(ATTEMPT_ID_BYTES))

MAX_RELAY_DELAY = 60.0
"""Seconds: the longest wait before dialling the relay a request may ask for."""
RELAY_KEY_BYTES = 32


def _relay_delay(_: object, __: object, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"relay_delay must be seconds, not {value!r}")
    if not 0 <= value <= MAX_RELAY_DELAY:
        raise ValueError(f"relay_delay must be 0..{MAX_RELAY_DELAY:g} s, not {value!r}")


@attrs.frozen
class ConnectRequest:
    """client → server: introduce me to ``target``; ``request_id`` is echoed back.

    ``relay_delay``: seconds after the introduction (0..:data:`MAX_RELAY_DELAY`)
    both peers dial the rendezvous's relay, if it has one (:class:`RelayGrant`);
    ``None``: no relay for this attempt.

    ``upgrade``: the attempt ID of a relayed stream to ``target`` that this
    punch would move to a direct connection (:mod:`punch._handover`);
    ``None``: a new stream.
    """

    target: str = attrs.field(validator=_name)
    request_id: int = attrs.field(validator=_request_id)
    relay_delay: float | None = attrs.field(default=None, validator=_relay_delay)
    upgrade: bytes | None = attrs.field(default=None, validator=_optional_attempt_id)


MAX_TICKET = 160
"""Bytes: the largest relay ticket (16 + 8 + two names of at most 64, with their lengths)."""


def _ticket(_: object, attribute: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_TICKET:
        raise ValueError(f"{attribute.name} must be 1-{MAX_TICKET} bytes")


@attrs.frozen
class RelayGrant:
    """In an :class:`Introduction`: a relay both peers may bind this attempt to.

    Args:
        endpoint: the relay's TCP endpoint, as this peer can reach it.
        ticket: what the relay needs to know of the attempt (its ID, the two
            names, when the grant expires: :class:`punch._relay.Ticket`),
            opaque to peers; at most :data:`MAX_TICKET` bytes.
        key: 32 bytes, the relay's MAC of the ticket
            (:func:`punch._relay.grant_key`); a Bind proves it without
            sending it. It is not the attempt's secret, which the relay never
            learns: it cannot pass the peers' handshake.
        delay: seconds after the introduction both peers dial the relay
            (0..:data:`MAX_RELAY_DELAY`): the initiator's choice, 0 for a
            relayed stream only, else the stagger that gives the direct
            paths their head start.
    """

    endpoint: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))
    ticket: bytes = attrs.field(validator=_ticket, repr=lambda b: b.hex())
    key: bytes = attrs.field(validator=_exact_bytes(RELAY_KEY_BYTES), repr=lambda _: "<key>")
    delay: float = attrs.field(default=0.0, validator=_relay_delay)


@attrs.frozen
class Bind:
    """client → relay, first: join the relayed stream of one attempt.

    Args:
        ticket: the grant's ticket, as it came.
        role: which of the attempt's two peers we are.
        proof: 32 bytes, :func:`punch._relay.bind_proof` of the grant's key
            and ``role``.
    """

    ticket: bytes = attrs.field(validator=_ticket, repr=lambda b: b.hex())
    role: Role = attrs.field(validator=attrs.validators.instance_of(Role))
    proof: bytes = attrs.field(validator=_exact_bytes(RELAY_KEY_BYTES), repr=lambda _: "<proof>")


@attrs.frozen
class Bound:
    """relay → client: the other peer is bound too; raw bytes from here on."""


@attrs.frozen
class Introduction:
    """server → both peers at once: everything one punch attempt needs.

    Args:
        peer_name: the other peer.
        role: this receiver's :class:`Role`; the requester is the initiator.
        attempt_id: 16 random bytes naming the attempt.
        secret: 32 random bytes (256 bits), single use, keys the handshake MAC.
        candidates: the other peer's candidates (server-reflexive first).
        certificate: the other peer's registered certificate (DER): the only
            one our TLS accepts from it.
        request_id: the requester's ``ConnectRequest.request_id``; ``None``
            in the responder's copy.
    """

    peer_name: str = attrs.field(validator=_name)
    role: Role = attrs.field(validator=attrs.validators.instance_of(Role))
    attempt_id: bytes = attrs.field(
        validator=_exact_bytes(ATTEMPT_ID_BYTES), repr=lambda b: b.hex()
    )
    secret: bytes = attrs.field(validator=_exact_bytes(SECRET_BYTES), repr=lambda _: "<secret>")
    candidates: tuple[Candidate, ...] = attrs.field(
        validator=_bounded_tuple(Candidate, MAX_CANDIDATES + 1)
    )
    certificate: bytes = attrs.field(validator=_certificate, repr=False)
    request_id: int | None = attrs.field(default=None, validator=_optional_request_id)
    peer_nat: NatFacts | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(NatFacts))
    )
    """The other peer's :class:`~punch._nat.NatFacts`, if it reported them (``Report``)."""
    relay: RelayGrant | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(RelayGrant))
    )
    """A relay for this attempt, when the initiator asked for one
    (``ConnectRequest.relay_delay``) and the rendezvous has one."""
    upgrade: bytes | None = attrs.field(default=None, validator=_optional_attempt_id)
    """The request's ``upgrade``: this punch is for moving that relayed stream."""


@attrs.frozen
class Report:
    """client → server, once, after registration: what we measured of our NAT."""

    nat: NatFacts = attrs.field(validator=attrs.validators.instance_of(NatFacts))


@attrs.frozen
class Probed:
    """server → client on the probe port, first: the client's endpoint as seen there."""

    observed: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))


@attrs.frozen
class Reach:
    """client → server on the probe port: dial ``endpoint`` from the probe port.

    The server dials only the address the probe came from (another port of
    it is fine), so it cannot be aimed at anyone else; see :class:`Reached`.
    """

    endpoint: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))


@attrs.frozen
class Reached:
    """server → client, answering :class:`Reach`: did the dial complete a TCP handshake?

    Args:
        reached: True when the server's SYN drew a SYN-ACK (the NAT let it in
            and something listened); False when it was refused or timed out.
        outcome: how it ended, for people: ``"connected"``, ``"timed out"``,
            ``"refused"`` or an errno name (at most 64 characters).
    """

    reached: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    outcome: str = attrs.field()

    @outcome.validator
    def _check_outcome(self, _: object, value: str) -> None:
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise ValueError(f"outcome must be 1-64 characters, not {value!r}")


@attrs.frozen
class Error:
    """server → client: a refusal. ``request_id`` names the request, if any."""

    code: str = attrs.field()
    text: str = attrs.field()
    request_id: int | None = attrs.field(default=None, validator=_optional_request_id)

    @code.validator
    def _check_code(self, _: object, value: str) -> None:
        if not isinstance(value, str) or not _CODE_RE.fullmatch(value):
            raise ValueError(f"code must be 1-32 of [a-z-], not {value!r}")

    @text.validator
    def _check_text(self, _: object, value: str) -> None:
        if not isinstance(value, str) or len(value) > MAX_ERROR_TEXT:
            raise ValueError(f"text must be a str of at most {MAX_ERROR_TEXT} characters")


Message: TypeAlias = (
    Challenge
    | Register
    | Registered
    | ConnectRequest
    | Keepalive
    | Introduction
    | Report
    | Probed
    | Reach
    | Reached
    | Bind
    | Bound
    | Error
)

# --- wire form: one encoder and one strict decoder per type -------------------


def _endpoint_to_wire(e: Endpoint) -> dict[str, Any]:
    return {"ip": e.ip, "port": e.port}


def _candidate_to_wire(c: Candidate) -> dict[str, Any]:
    return {"type": c.type.value, "ip": c.endpoint.ip, "port": c.endpoint.port}


def _nat_to_wire(facts: NatFacts | None) -> dict[str, Any] | None:
    if facts is None:
        return None
    return {
        "mapping": facts.mapping.value,
        "port_preserving": facts.port_preserving,
        "allocation": facts.allocation.value,
        "step": facts.step,
        "ports": list(facts.ports),
    }


def _optional_hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _grant_to_wire(grant: RelayGrant | None) -> dict[str, Any] | None:
    if grant is None:
        return None
    return {
        "endpoint": _endpoint_to_wire(grant.endpoint),
        "ticket": grant.ticket.hex(),
        "key": grant.key.hex(),
        "delay": grant.delay,
    }


def _to_wire(m: Message) -> dict[str, Any]:
    if isinstance(m, Challenge):
        observed = None if m.observed is None else _endpoint_to_wire(m.observed)
        return {"type": "challenge", "nonce": m.nonce.hex(), "observed": observed}
    if isinstance(m, Register):
        return {
            "type": "register",
            "name": m.name,
            "certificate": m.certificate.hex(),
            "signature": m.signature.hex(),
            "candidates": [_endpoint_to_wire(e) for e in m.candidates],
            "token": m.token,
        }
    if isinstance(m, Keepalive):
        return {"type": "keepalive"}
    if isinstance(m, Registered):
        return {
            "type": "registered",
            "observed": _endpoint_to_wire(m.observed),
            "idle_timeout": m.idle_timeout,
        }
    if isinstance(m, ConnectRequest):
        return {
            "type": "connect",
            "target": m.target,
            "request_id": m.request_id,
            "relay_delay": m.relay_delay,
            "upgrade": _optional_hex(m.upgrade),
        }
    if isinstance(m, Introduction):
        return {
            "type": "introduction",
            "peer_name": m.peer_name,
            "role": m.role.value,
            "attempt_id": m.attempt_id.hex(),
            "secret": m.secret.hex(),
            "candidates": [_candidate_to_wire(c) for c in m.candidates],
            "certificate": m.certificate.hex(),
            "request_id": m.request_id,
            "peer_nat": _nat_to_wire(m.peer_nat),
            "relay": _grant_to_wire(m.relay),
            "upgrade": _optional_hex(m.upgrade),
        }
    if isinstance(m, Report):
        return {"type": "report", "nat": _nat_to_wire(m.nat)}
    if isinstance(m, Probed):
        return {"type": "probed", "observed": _endpoint_to_wire(m.observed)}
    if isinstance(m, Reach):
        return {"type": "reach", "endpoint": _endpoint_to_wire(m.endpoint)}
    if isinstance(m, Reached):
        return {"type": "reached", "reached": m.reached, "outcome": m.outcome}
    if isinstance(m, Bind):
        return {
            "type": "bind",
            "ticket": m.ticket.hex(),
            "role": m.role.value,
            "proof": m.proof.hex(),
        }
    if isinstance(m, Bound):
        return {"type": "bound"}
    if isinstance(m, Error):
        return {"type": "error", "code": m.code, "text": m.text, "request_id": m.request_id}
    raise LocalProtocolError(f"not a rendezvous message: {m!r}")


class _Fields:
    """Strict reader of one decoded JSON object: every key read exactly once."""

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{what} must be a JSON object")
        self._obj: dict[str, Any] = obj
        self._what = what
        self._read: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self._obj:
            raise RemoteProtocolError(f"{self._what}: missing field {key!r}")
        value = self._obj[key]
        self._read.add(key)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise RemoteProtocolError(f"{self._what}: field {key!r} has the wrong type")
        return value

    def done(self) -> None:
        extra = set(self._obj) - self._read
        if extra:
            raise RemoteProtocolError(f"{self._what}: unknown field(s) {sorted(extra)}")


def _endpoint_from_wire(obj: object) -> Endpoint:
    f = _Fields(obj, "endpoint")
    endpoint = Endpoint(f.get("ip", str), f.get("port", int))
    f.done()
    return endpoint


def _candidate_from_wire(obj: object) -> Candidate:
    f = _Fields(obj, "candidate")
    kind = CandidateType(f.get("type", str))
    candidate = Candidate(kind, Endpoint(f.get("ip", str), f.get("port", int)))
    f.done()
    return candidate


def _nat_from_wire(obj: object) -> NatFacts:
    f = _Fields(obj, "nat")
    facts = NatFacts(
        Mapping(f.get("mapping", str)),
        f.get("port_preserving", bool),
        Allocation(f.get("allocation", str)),
        f.get("step", (int, type(None))),
        tuple(f.get("ports", list)),
    )
    f.done()
    return facts


def _grant_from_wire(obj: object) -> RelayGrant:
    f = _Fields(obj, "relay")
    grant = RelayGrant(
        _endpoint_from_wire(f.get("endpoint", dict)),
        _hex(f, "ticket"),
        _hex(f, "key"),
        f.get("delay", (int, float)),
    )
    f.done()
    return grant


def _list(f: _Fields, key: str, item: Callable[[object], Any]) -> tuple[Any, ...]:
    return tuple(item(v) for v in f.get(key, list))


_OPTIONAL_INT = (int, type(None))


def _optional(obj: object, read: Callable[[object], Any]) -> Any:
    """``read(obj)``, or None for a JSON null."""
    return None if obj is None else read(obj)


_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")


def _hex(f: _Fields, key: str) -> bytes:
    return _unhex(f.get(key, str), key)


def _unhex(text: str, key: str) -> bytes:
    if not _HEX_RE.fullmatch(text):
        raise RemoteProtocolError(f"frame: field {key!r} is not lowercase hex")
    return bytes.fromhex(text)


def _optional_hex_field(f: _Fields, key: str) -> bytes | None:
    """A hex field that may be null."""
    text = f.get(key, (str, type(None)))
    return None if text is None else _unhex(text, key)


def _from_wire(obj: object) -> Message:
    f = _Fields(obj, "frame")
    kind = f.get("type", str)
    message: Message
    if kind == "challenge":
        observed = f.get("observed", (dict, type(None)))
        message = Challenge(_hex(f, "nonce"), _optional(observed, _endpoint_from_wire))
    elif kind == "register":
        message = Register(
            f.get("name", str),
            _hex(f, "certificate"),
            _hex(f, "signature"),
            _list(f, "candidates", _endpoint_from_wire),
            f.get("token", (str, type(None))),
        )
    elif kind == "keepalive":
        message = Keepalive()
    elif kind == "registered":
        message = Registered(
            _endpoint_from_wire(f.get("observed", dict)), f.get("idle_timeout", (int, float))
        )
    elif kind == "connect":
        message = ConnectRequest(
            f.get("target", str),
            f.get("request_id", int),
            f.get("relay_delay", (int, float, type(None))),
            _optional_hex_field(f, "upgrade"),
        )
    elif kind == "introduction":
        message = Introduction(
            peer_name=f.get("peer_name", str),
            role=Role(f.get("role", str)),
            attempt_id=_hex(f, "attempt_id"),
            secret=_hex(f, "secret"),
            candidates=_list(f, "candidates", _candidate_from_wire),
            certificate=_hex(f, "certificate"),
            request_id=f.get("request_id", _OPTIONAL_INT),
            peer_nat=_optional(f.get("peer_nat", (dict, type(None))), _nat_from_wire),
            relay=_optional(f.get("relay", (dict, type(None))), _grant_from_wire),
            upgrade=_optional_hex_field(f, "upgrade"),
        )
    elif kind == "report":
        message = Report(_nat_from_wire(f.get("nat", dict)))
    elif kind == "probed":
        message = Probed(_endpoint_from_wire(f.get("observed", dict)))
    elif kind == "reach":
        message = Reach(_endpoint_from_wire(f.get("endpoint", dict)))
    elif kind == "reached":
        message = Reached(f.get("reached", bool), f.get("outcome", str))
    elif kind == "bind":
        message = Bind(
            _hex(f, "ticket"),
            Role(f.get("role", str)),
            _hex(f, "proof"),
        )
    elif kind == "bound":
        message = Bound()
    elif kind == "error":
        message = Error(f.get("code", str), f.get("text", str), f.get("request_id", _OPTIONAL_INT))
    else:
        raise RemoteProtocolError(f"unknown frame type {kind!r}")
    f.done()
    return message


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RemoteProtocolError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise RemoteProtocolError(f"{name} is not allowed")


def encode_frame(message: Message) -> bytes:
    """One message as one frame.

    Raises:
        LocalProtocolError: not a message, or its frame would exceed :data:`MAX_FRAME`.
    """
    body = json.dumps(_to_wire(message), separators=(",", ":"), ensure_ascii=False).encode()
    return frame_body(body)


def frame_body(body: bytes) -> bytes:
    """One frame (header, then ``body``) for an encoded body.

    Raises:
        LocalProtocolError: the frame would exceed :data:`MAX_FRAME`.
    """
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"frame of {len(body) + _HEADER.size} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(_MAGIC, PROTOCOL_VERSION, len(body)) + body


def decode_body(body: bytes) -> Message:
    """Parse one frame body (the bytes after the header).

    Raises:
        RemoteProtocolError: anything but a well-formed message.
    """
    try:
        obj = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
        return _from_wire(obj)
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; the attrs
        # validators raise ValueError/TypeError for out-of-range fields.
        raise RemoteProtocolError(f"malformed frame: {exc}") from exc


class Side(enum.Enum):
    """Which end of a rendezvous control connection we are."""

    CLIENT = "client"
    SERVER = "server"


_SENT_BY = {
    Challenge: Side.SERVER,
    Register: Side.CLIENT,
    ConnectRequest: Side.CLIENT,
    Keepalive: Side.CLIENT,
    Report: Side.CLIENT,
    Registered: Side.SERVER,
    Introduction: Side.SERVER,
    Probed: Side.SERVER,
    Reach: Side.CLIENT,
    Reached: Side.SERVER,
    Bind: Side.CLIENT,
    Bound: Side.SERVER,
    Error: Side.SERVER,
}
_PROBE_ORDER = (Probed, Reach, Reached)
_PROBE_PORT = (*_PROBE_ORDER, Error)
"""What the probe port's order allows; its connection allows nothing else."""
_RELAY_ORDER = (Bind, Bound)
_RELAY_PORT = (*_RELAY_ORDER, Error)
"""The relay port's frames, in that order; after ``Bound`` no frame at all."""


class RendezvousConnection:
    """The state of one control connection, from one side.

    Args:
        our_side: :class:`Side` we play.
        max_frame: the largest frame we accept, in bytes, header included
            (:data:`MIN_FRAME` .. :data:`MAX_FRAME`; a server may lower it).
        probe: the probe port's order (see the module) instead of the control
            connection's.
        relay: the relay port's order: after the ``Bind`` (as the server) or
            the ``Bound`` (as the client), what follows is payload, never
            parsed; :meth:`trailing` hands over what was read past the frame.

    ``send(message)`` returns the bytes to write; ``receive_data(data)`` takes
    bytes read (``b""`` for end of stream) and returns the messages completed.
    After a :class:`RemoteProtocolError` the connection is broken and every
    further ``receive_data`` raises again: close it.
    """

    def __init__(
        self,
        our_side: Side,
        max_frame: int = MAX_FRAME,
        *,
        probe: bool = False,
        relay: bool = False,
    ) -> None:
        if not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be {MIN_FRAME}..{MAX_FRAME} bytes, not {max_frame}")
        self.our_side = our_side
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._registered = False  # Register sent/received and Registered answered
        self._register_seen = False
        self._early_keepalive = False  # the one Keepalive a client may send first
        self._reported = False
        self._challenge: bytes | None = None
        self._broken: RemoteProtocolError | None = None
        self.probe = probe
        self.relay = relay
        self._probe_step = 0  # the probe or relay order's frames so far (Error aside)
        self._raw = False  # relay: past Bind (server) or Bound (client), bytes are payload

    @property
    def challenge(self) -> bytes | None:
        """The Challenge's nonce once sent (server) or received (client); else ``None``."""
        return self._challenge

    @property
    def registered(self) -> bool:
        """True once ``Registered`` has been sent (server) or received (client)."""
        return self._registered

    def trailing(self) -> bytes:
        """Relay: the bytes read past the last frame (payload once it has ended), now ours."""
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    def send(self, message: Message, frame: bytes | None = None) -> bytes:
        """Bytes for ``message``: ``frame`` if given (its encoding, made elsewhere:
        an introduction another rendezvous process forwarded), else encoded here.

        Raises:
            LocalProtocolError: this side may not send it now.
        """
        sender = _SENT_BY.get(type(message))
        if sender is not self.our_side:
            raise LocalProtocolError(f"{self.our_side.value} may not send {type(message).__name__}")
        self._check_order(message, LocalProtocolError)
        return encode_frame(message) if frame is None else frame

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes read from the peer; ``b""`` means it closed its side.

        Returns:
            the messages completed by these bytes, in order.

        Raises:
            RemoteProtocolError: a bad header, an oversized frame (detected from
                the header, before its body is buffered), a malformed body, a
                message the peer may not send now, or end of stream mid-frame.
        """
        if self._broken is not None:
            raise self._broken
        try:
            return self._receive(data)
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _receive(self, data: bytes | bytearray) -> list[Message]:
        if not data:
            if self._buffer:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return []
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= _HEADER.size and not self._raw:
            magic, version, length = _HEADER.unpack_from(self._buffer)
            if magic != _MAGIC:
                raise RemoteProtocolError("not a punch rendezvous frame")
            if version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version {version}, expected {PROTOCOL_VERSION}", code="bad-version"
                )
            if length + _HEADER.size > self.max_frame:
                raise RemoteProtocolError(
                    f"frame of {length + _HEADER.size} bytes exceeds {self.max_frame}",
                    code="frame-too-large",
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            message = decode_body(body)
            sender = _SENT_BY[type(message)]
            if sender is self.our_side:
                raise RemoteProtocolError(f"{type(message).__name__} is not for a {sender.value}")
            self._check_order(message, RemoteProtocolError)
            messages.append(message)
            self._raw = self.relay and isinstance(message, Bind | Bound)
        return messages

    def _check_order(self, message: Message, error: type[Exception]) -> None:
        if self.probe or self.relay or isinstance(message, Probed | Reach | Reached | Bind | Bound):
            self._check_port_order(message, error)
        elif isinstance(message, Challenge):
            if self._challenge is not None:
                raise error("Challenge may be sent only once")
            self._challenge = message.nonce
        elif isinstance(message, Register):
            if self._register_seen:
                raise error("Register may be sent only once")
            if self._challenge is None:
                raise error("Register before the server's Challenge")
            self._register_seen = True
        elif isinstance(message, Registered):
            if not self._register_seen or self._registered:
                raise error("Registered must answer the one Register")
            self._registered = True
        elif isinstance(message, Keepalive) and not self._registered:
            if self._register_seen or self._early_keepalive:
                raise error("Keepalive before registration completed (one may come first)")
            self._early_keepalive = True
        elif isinstance(message, ConnectRequest | Introduction | Report) and not self._registered:
            raise error(f"{type(message).__name__} before registration completed")
        elif isinstance(message, Report):
            if self._reported:
                raise error("Report may be sent only once")
            self._reported = True

    def _check_port_order(self, message: Message, error: type[Exception]) -> None:
        """The probe port's order (Probed, then at most one Reach and its Reached)
        or the relay port's (Bind, then Bound); ``Error`` at any time."""
        kind = type(message)
        allowed, order, where = (
            (_RELAY_PORT, _RELAY_ORDER, "the relay port")
            if self.relay
            else (_PROBE_PORT, _PROBE_ORDER, "the probe port")
        )
        if not (self.probe or self.relay) or kind not in allowed:
            where = where if self.probe or self.relay else "a control connection"
            raise error(f"{kind.__name__} is not sent on {where}")
        expected = order[self._probe_step] if self._probe_step < len(order) else None
        if kind is not Error and kind is not expected:
            names = ", ".join(k.__name__ for k in order)
            raise error(f"{kind.__name__} out of {where}'s order ({names})")
        if kind is not Error:
            self._probe_step += 1
