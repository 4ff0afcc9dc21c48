"""The relay (issue 17): two peers' byte streams spliced where no direct path exists.

A relayed candidate (RFC 8445 §5.1.1.2), in TCP, as TURN's TCP allocations
(RFC 6062) and Tailscale's DERP carry it: each peer opens one TCP connection
to the relay and binds it to the introduction's attempt (:class:`Bind`); the
relay pairs the initiator's with the responder's, answers both ``Bound``,
then copies bytes both ways, each direction's FIN passed on as a FIN
(``shutdown(SHUT_WR)``), until both have ended. It reads no payload: the
peers run the same handshake and TLS over it as over a direct stream, so the
relay sees ciphertext only (with ``encrypt`` off, plaintext: see README).

Who may bind: the rendezvous mints a :class:`~punch._protocol.RelayGrant`
per introduction, a ticket (:class:`Ticket`: the attempt, the two names,
an expiry) and its key, the relay's HMAC-SHA256 of the ticket under a secret
only rendezvous and relay hold (:func:`grant_key`). A Bind carries the
ticket and a proof of the key bound to the sender's role (:func:`bind_proof`),
so the relay checks it from the ticket alone, keeping no state per grant; the
key is not the attempt's secret, so the relay cannot pass the peers'
handshake. Each attempt binds once (replays are refused until it expires).

Every resource a binder can make the relay hold is bounded
(:class:`RelayLimits`), and every refusal at bind time is an ``Error`` frame
with a typed code. The payload moves socket to pipe to socket by splice(2)
and never enters the process: a kernel pipe per direction holds at most
:data:`CHUNK` bytes, and a reader that does not read stops the move toward
it (TCP flow control), and so its writer, never a buffer here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import math
import os
import secrets
import struct
import time
from typing import Any

import attrs
import trio

from ._control import ControlChannel
from ._endpoint import Endpoint, Role
from ._errors import HandshakeError, HandshakeInterrupted, RelayRefused, RemoteProtocolError
from ._protocol import (
    ATTEMPT_ID_BYTES,
    MAX_TICKET,
    Bind,
    Bound,
    Error,
    RelayGrant,
    RendezvousConnection,
    Side,
    check_name,
)

log = logging.getLogger("punch.relay")

_RECEIVE_SIZE = 4096
CHUNK = 262144
"""Bytes: the most one direction of a circuit moves at once, and holds in its kernel
pipe (``F_SETPIPE_SZ``, pipe(7); where refused, the default 64 KiB). Against 64 KiB,
the relay's CPU per GiB fell from 0.49 to 0.36 s (loopback, plaintext, one run)."""
_GRANT_LABEL = b"punch relay grant v1\0"
_PROOF_LABEL = b"punch relay bind v1\0"
_TICKET_HEAD = struct.Struct("!16sQ")
MIB = 1 << 20
GIB = 1 << 30


class Refused(Exception):
    """A refusal: the ``Error`` frame to send, then the connection is closed."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.text}")
        self.error = error


@attrs.frozen
class Ticket:
    """What a relay knows of one attempt: its ID, the two peers' names, the expiry.

    Args:
        attempt_id: the introduction's 16 bytes.
        initiator, responder: the requester's and the target's names.
        expires: Unix time, whole seconds, after which a Bind is refused.
    """

    attempt_id: bytes
    initiator: str
    responder: str
    expires: int

    def encode(self) -> bytes:
        """Wire form: attempt ID, expiry (u64), then each name with a length byte."""
        names = b"".join(bytes([len(n)]) + n.encode() for n in (self.initiator, self.responder))
        return _TICKET_HEAD.pack(self.attempt_id, self.expires) + names

    @classmethod
    def decode(cls, data: bytes) -> Ticket:
        """The ticket in ``data``.

        Raises:
            Refused: ``bad-ticket``: not a ticket's wire form.
        """
        try:
            attempt_id, expires = _TICKET_HEAD.unpack_from(data)
            names, at = [], _TICKET_HEAD.size
            for _ in range(2):
                size = data[at]
                names.append(check_name(data[at + 1 : at + 1 + size].decode("ascii")))
                at += 1 + size
            if at != len(data):
                raise ValueError("trailing bytes")
        except (struct.error, IndexError, ValueError, TypeError) as exc:
            raise Refused(Error("bad-ticket", f"not a relay ticket: {exc}")) from exc
        return cls(attempt_id, names[0], names[1], expires)

    def name(self, role: Role) -> str:
        """The name of the peer that plays ``role``."""
        return self.initiator if role is Role.INITIATOR else self.responder


def grant_key(relay_secret: bytes, ticket: bytes) -> bytes:
    """The key of a grant: HMAC-SHA256 (RFC 2104) of the ticket's wire form, keyed
    with the relay's secret (32 bytes, :func:`secrets.token_bytes`)."""
    return hmac.digest(relay_secret, _GRANT_LABEL + ticket, "sha256")


def bind_proof(key: bytes, role: Role) -> bytes:
    """A Bind's proof: HMAC-SHA256 of the sender's role under the grant's key, so
    one peer's Bind, seen on the wire, does not bind the other role."""
    return hmac.digest(key, _PROOF_LABEL + role.value.encode(), "sha256")


def _count(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number, not {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be finite and > 0, not {value!r}")


@attrs.frozen
class RelayLimits:
    """Every bound of one relay; each is a ``punch-rendezvous`` flag. The code in
    brackets is the ``Error`` a Bind gets when the bound refuses it.

    Args:
        max_circuits: relayed streams at once, halves waiting for their
            other peer included (``relay-full``).
        max_circuits_per_peer: the same, per peer name (``peer-limit``).
        max_bytes_per_circuit: bytes one relayed stream carries, both
            directions together; then it is reset. Default 1 GiB.
        max_bytes_per_peer_hour: bytes a peer's relayed streams carry in one
            clock hour (both directions, all its streams); a Bind in an hour
            already spent is refused (``peer-quota``), a stream that spends
            it is reset. Default 4 GiB.
        rate: bytes per second each direction of a stream may carry (a token
            bucket one second deep, at least :data:`CHUNK`; the sender is
            slowed, nothing is dropped). Default 1 MiB/s.
        max_lifetime: seconds a relayed stream may last; then it is reset.
            Default 3600.
        bind_timeout: seconds a bound half waits for the other peer
            (``bind-timeout``), and a new connection for its Bind.
        grant_lifetime: seconds from the introduction a grant may be used
            (``expired`` after).
    """

    max_circuits: int = attrs.field(default=1024, validator=_count)
    max_circuits_per_peer: int = attrs.field(default=8, validator=_count)
    max_bytes_per_circuit: int = attrs.field(default=GIB, validator=_count)
    max_bytes_per_peer_hour: int = attrs.field(default=4 * GIB, validator=_count)
    rate: int = attrs.field(default=MIB, validator=_count)
    max_lifetime: float = attrs.field(default=3600.0, validator=_count)
    bind_timeout: float = attrs.field(default=10.0, validator=_count)
    grant_lifetime: float = attrs.field(default=60.0, validator=_count)


class _QuotaSpent(Exception):
    """A byte quota ran out mid-stream: the circuit is reset."""


@attrs.define
class TokenBucket:
    """``rate`` bytes a second, at most ``depth`` saved up (trio time).

    :meth:`take` sleeps until ``size`` tokens are there; the first ``depth``
    bytes go at once.
    """

    rate: float
    depth: float
    _tokens: float = attrs.field(init=False)
    _at: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.depth
        self._at = trio.current_time()

    async def take(self, size: int) -> None:
        now = trio.current_time()
        self._tokens = min(self.depth, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= size
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
        else:
            await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class _Half:
    channel: ControlChannel
    stream: trio.SocketStream
    name: str
    observed: Endpoint


@attrs.define(eq=False)
class _Circuit:
    ticket: Ticket
    halves: dict[Role, _Half] = attrs.field(factory=dict)
    paired: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    bytes: int = 0


def _secret(value: bytes | None) -> bytes:
    return secrets.token_bytes(32) if value is None else value


@attrs.define(eq=False)
class Relay:
    """The relay's state: one per relay port (:func:`punch.serve_rendezvous` ``relay_port``).

    Args:
        limits: :class:`RelayLimits`.
        secret: at least 32 bytes, shared with the rendezvous that mints the
            grants (default or None: 32 fresh random bytes, for a relay in the
            rendezvous's process).
    """

    limits: RelayLimits = attrs.field(factory=RelayLimits)
    secret: bytes = attrs.field(default=None, converter=_secret, repr=False)
    circuits: dict[bytes, _Circuit] = attrs.field(factory=dict, init=False)
    per_peer: dict[str, int] = attrs.field(factory=dict, init=False)
    _used: dict[bytes, int] = attrs.field(factory=dict, init=False)
    """Attempt ID -> expiry, for attempts already bound: replays are refused."""
    _hourly: dict[str, tuple[int, int]] = attrs.field(factory=dict, init=False)
    """Peer name -> (clock hour, bytes carried in it)."""

    @secret.validator
    def _check_secret(self, _: object, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) < 32:
            raise ValueError("a relay secret must be at least 32 bytes")

    def ticket(self, attempt_id: bytes, initiator: str, responder: str) -> tuple[bytes, bytes]:
        """A ticket for one attempt, valid :attr:`RelayLimits.grant_lifetime` seconds,
        and its key (:func:`grant_key`): what a :class:`~punch._protocol.RelayGrant`
        carries."""
        assert len(attempt_id) == ATTEMPT_ID_BYTES
        expires = math.ceil(time.time() + self.limits.grant_lifetime)
        ticket = Ticket(attempt_id, initiator, responder, expires).encode()
        assert len(ticket) <= MAX_TICKET
        return ticket, grant_key(self.secret, ticket)

    def _admit(self, bind: Bind) -> Ticket:
        """The ticket of a valid Bind, counted; else :class:`Refused`."""
        ticket = Ticket.decode(bind.ticket)
        expected = bind_proof(grant_key(self.secret, bind.ticket), bind.role)
        if not hmac.compare_digest(expected, bind.proof):
            raise Refused(Error("bad-proof", "the proof is not of this ticket's key"))
        now = time.time()
        if now > ticket.expires:
            raise Refused(Error("expired", "the grant has expired"))
        while self._used:  # oldest first: tickets are minted in time order
            attempt, expiry = next(iter(self._used.items()))
            if expiry >= now:
                break
            del self._used[attempt]
        circuit = self.circuits.get(ticket.attempt_id)
        if ticket.attempt_id in self._used and circuit is None:
            raise Refused(Error("attempt-used", "this attempt was relayed already"))
        if circuit is not None and bind.role in circuit.halves:
            raise Refused(Error("role-taken", f"the {bind.role.value} is bound already"))
        name = ticket.name(bind.role)
        if circuit is None and len(self.circuits) >= self.limits.max_circuits:
            raise Refused(Error("relay-full", f"{self.limits.max_circuits} relayed streams"))
        if self.per_peer.get(name, 0) >= self.limits.max_circuits_per_peer:
            raise Refused(
                Error("peer-limit", f"{self.limits.max_circuits_per_peer} relayed streams")
            )
        if self._spent(name) >= self.limits.max_bytes_per_peer_hour:
            raise Refused(Error("peer-quota", "this peer's relayed bytes for the hour are spent"))
        return ticket

    def _spent(self, name: str, more: int = 0) -> int:
        """Bytes ``name``'s relayed streams carried this clock hour, ``more`` added."""
        hour = int(time.time() // 3600)
        held_hour, used = self._hourly.get(name, (hour, 0))
        used = (used if held_hour == hour else 0) + more
        if more:
            self._hourly[name] = (hour, used)
        return used

    async def serve(
        self, channel: ControlChannel, stream: trio.SocketStream, observed: Endpoint
    ) -> None:
        """One relay-port connection: its Bind, the wait for the other peer, and, on the
        second half's task, the copy both ways. Returns when the circuit has ended.

        Raises:
            Refused: a refusal to send before closing (see :class:`RelayLimits`,
                :meth:`_admit`; ``bind-timeout`` when the other peer does not come).
        """
        with trio.move_on_after(self.limits.bind_timeout) as waiting:
            bind = await channel.receive()
        if waiting.cancelled_caught:
            raise Refused(Error("bind-timeout", f"no Bind within {self.limits.bind_timeout:g} s"))
        if bind is None:
            return
        assert isinstance(bind, Bind)  # the relay order admits nothing else first
        ticket = self._admit(bind)
        circuit = self.circuits.setdefault(ticket.attempt_id, _Circuit(ticket))
        half = _Half(channel, stream, ticket.name(bind.role), observed)
        circuit.halves[bind.role] = half
        self.per_peer[half.name] = self.per_peer.get(half.name, 0) + 1
        self._used[ticket.attempt_id] = ticket.expires
        try:
            if len(circuit.halves) == 2:
                circuit.paired.set()
            with trio.move_on_after(self.limits.bind_timeout):
                await circuit.paired.wait()
            if not circuit.paired.is_set():
                raise Refused(Error("bind-timeout", "the other peer did not bind in time"))
            if half is circuit.halves[Role.RESPONDER]:
                await self._run(circuit)
            else:
                await circuit.done.wait()
        finally:
            self._leave(circuit, half)

    def _leave(self, circuit: _Circuit, half: _Half) -> None:
        """Uncount one half; the circuit goes when its last half does."""
        left = self.per_peer.get(half.name, 0) - 1
        if left > 0:
            self.per_peer[half.name] = left
        else:
            self.per_peer.pop(half.name, None)
        for role, held in list(circuit.halves.items()):
            if held is half:
                del circuit.halves[role]
        if not circuit.halves and self.circuits.get(circuit.ticket.attempt_id) is circuit:
            del self.circuits[circuit.ticket.attempt_id]

    async def _run(self, circuit: _Circuit) -> None:
        """Tell both ``Bound``, then copy both ways until both FINs have passed (a
        clean close), or reset both on an error, a spent quota or the lifetime."""
        a, b = circuit.halves[Role.INITIATOR], circuit.halves[Role.RESPONDER]
        label = f"relay {circuit.ticket.attempt_id.hex()[:8]} ({a.name!r} - {b.name!r})"
        why: str | None = "lifetime"
        try:
            with trio.move_on_after(self.limits.max_lifetime):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.channel.send, Bound())
                    nursery.start_soon(b.channel.send, Bound())
                log.info("%s: %s <-> %s", label, a.observed, b.observed)
                why = await self._splice(circuit, a, b)
            if why is None:
                log.info("%s: closed after %d bytes", label, circuit.bytes)
                for half in (a, b):  # both FINs passed: a graceful close, no RST
                    await half.stream.aclose()
            else:
                log.info("%s: reset after %d bytes: %s", label, circuit.bytes, why)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: lost after %d bytes: %s", label, circuit.bytes, exc.__cause__ or exc)
        finally:  # the other half's task returns now, and its socket is reset if still open
            circuit.done.set()

    async def _splice(self, circuit: _Circuit, a: _Half, b: _Half) -> str | None:
        """Both directions at once; None when both ended with a FIN, else why not."""
        errors: list[str] = []

        async def pipe(src: _Half, dst: _Half, scope: trio.CancelScope) -> None:
            try:
                await self._pipe(circuit, src, dst)
            except (trio.BrokenResourceError, trio.ClosedResourceError, _QuotaSpent) as exc:
                errors.append(str(exc.__cause__ or exc) or type(exc).__name__)
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, a, b, nursery.cancel_scope)
            nursery.start_soon(pipe, b, a, nursery.cancel_scope)
        return errors[0] if errors else None

    async def _pipe(self, circuit: _Circuit, src: _Half, dst: _Half) -> None:
        """Move ``src``'s bytes to ``dst`` until its FIN, passed on as a FIN.

        Through a kernel pipe (splice(2)): the payload never enters this
        process, and the pipe holds at most :data:`CHUNK` bytes, moved on
        before the next read, so a reader that does not read stops its writer
        (TCP flow control) instead of growing anything here. Bytes that came
        with the Bind go first.
        """
        bucket = TokenBucket(self.limits.rate, max(self.limits.rate, CHUNK))
        first = src.channel.connection.trailing()
        if first:
            await self._account(circuit, src, dst, bucket, len(first))
            await dst.stream.send_all(first)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # pipe(7): else its default 64 KiB
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
            while moved := await _splice(src.stream.socket, write_end, CHUNK, into_pipe=True):
                await self._account(circuit, src, dst, bucket, moved)
                while moved:
                    moved -= await _splice(dst.stream.socket, read_end, moved, into_pipe=False)
            await dst.stream.send_eof()
        finally:
            os.close(read_end)
            os.close(write_end)

    async def _account(
        self, circuit: _Circuit, src: _Half, dst: _Half, bucket: TokenBucket, size: int
    ) -> None:
        """Count ``size`` bytes against every quota they touch, then wait for the rate.

        Raises:
            _QuotaSpent: the circuit's bytes, or either peer's for the hour.
        """
        circuit.bytes += size
        if circuit.bytes > self.limits.max_bytes_per_circuit:
            raise _QuotaSpent(f"{self.limits.max_bytes_per_circuit} bytes carried")
        spent = {name: self._spent(name, size) for name in (src.name, dst.name)}
        for name, used in spent.items():  # both charged first: each carried them
            if used > self.limits.max_bytes_per_peer_hour:
                raise _QuotaSpent(f"{name!r}'s relayed bytes for the hour are spent")
        await bucket.take(size)


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def _splice(sock: trio.socket.SocketType, pipe: int, size: int, *, into_pipe: bool) -> int:
    """splice(2) up to ``size`` bytes from ``sock`` into ``pipe`` (``into_pipe``), or
    from ``pipe`` into ``sock``, waiting until ``sock`` is ready; 0 at ``sock``'s FIN.

    Raises:
        trio.BrokenResourceError: the socket failed (reset, closed).
    """
    while True:
        try:
            if into_pipe:
                return os.splice(sock.fileno(), pipe, size, flags=_SPLICE_FLAGS)
            return os.splice(pipe, sock.fileno(), size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        if into_pipe:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.wait_writable(sock)


async def bind(stream: trio.abc.Stream, grant: RelayGrant, role: Role) -> bytes:
    """Bind ``stream`` (connected to ``grant.endpoint``) as ``role``; wait for ``Bound``.

    Returns:
        the bytes read past ``Bound``: the other peer's first bytes.

    Raises:
        RelayRefused: the relay's ``Error`` (its code: see :class:`RelayLimits`).
        HandshakeInterrupted: the connection closed or broke before an answer.
        HandshakeError: the relay broke the protocol.
    """
    connection = RendezvousConnection(Side.CLIENT, relay=True)
    try:
        await stream.send_all(
            connection.send(Bind(grant.ticket, role, bind_proof(grant.key, role)))
        )
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            for message in connection.receive_data(data):
                if isinstance(message, Error):
                    raise RelayRefused(message.code, message.text)
                return connection.trailing()  # Bound: the relay order admits nothing else
            if not data:
                raise HandshakeInterrupted("the relay closed the connection before answering")
    except trio.BrokenResourceError as exc:
        raise HandshakeInterrupted(f"relay connection lost: {exc.__cause__ or exc}") from exc
    except RemoteProtocolError as exc:
        raise HandshakeError(f"the relay broke the protocol: {exc}") from exc
