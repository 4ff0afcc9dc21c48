"""The registry that rendezvous processes share in Redis (issue 18).

Each process keeps its own control connections and peers; what the others
need of them lives in Redis, under one key prefix (``punch`` by default):

``{prefix}:process:{id}``
    a process's lease: set with a ``PX`` expiry of :data:`PROCESS_LEASE`
    seconds and renewed every :data:`HEARTBEAT` seconds. A process whose
    lease has run out is dead, and so are its registrations.
``{prefix}:name:{name}``
    a hash, one field per registration of that name, ``{process}/{serial}``,
    whose value is a JSON record: peer ID, address family, server-reflexive
    and host candidates, certificate, NAT report. A Lua script claims a
    field atomically (:meth:`Cluster.claim`): the name is taken when a live
    process holds it under another key, or under the same key over the same
    address family (the single-process rule, cluster-wide); fields of dead
    processes are dropped on the way. The hash expires after
    :data:`NAME_LEASE` seconds unless renewed, so a dead process's names are
    forgotten even if nobody asks for them.
``{prefix}:bound``
    with ``persist_names``, each name's first key (trust on first use).
``{prefix}:rate:{kind}:{key}``
    a sorted set of event times: the sliding-window limits that must hold
    across processes (registrations per source).
``{prefix}:connections:{source}``
    a hash, one field per process: its connections from that source (the
    concurrent-connections limit, cluster-wide; a dead process's field is
    dropped by the next count).
``{prefix}:to:{id}``
    the pub/sub channel on which other processes hand a process the
    introductions for its peers. One script finds the peer and publishes
    its introduction (:meth:`Cluster.introduce`, one round trip; the
    introductions asked meanwhile share the next call, and one message per
    process), and Redis writes the message to the subscriber before it
    answers the publisher, so both introductions leave within about one
    round trip to Redis.

Redis is reached through ``coredis`` (built on anyio, so it runs on trio;
``tests/test_cluster.py`` proves it against a real ``redis-server``). Every
call is bounded by :data:`REDIS_TIMEOUT`; one that fails or times out raises
:class:`ClusterUnavailable`. While Redis cannot be reached the server keeps
serving the peers registered on it (their names are then unique on this
process only) and refuses introductions to anyone else with
``cluster-unavailable``; when it is back, the next heartbeat writes every
local registration again (after a Redis restart, or a partition longer than
the lease).

The scripts touch keys they are not passed (the process leases), so the
registry needs one Redis server (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import json
import logging
import math
import os
import secrets
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ._endpoint import Candidate, Endpoint
from ._errors import PunchError
from ._nat import NatFacts
from ._protocol import (
    _HEADER,
    Introduction,
    _endpoint_from_wire,
    _endpoint_to_wire,
    _nat_from_wire,
    _nat_to_wire,
    decode_body,
    encode_frame,
    frame_body,
    introduction_candidates,
)

if TYPE_CHECKING:
    import coredis

log = logging.getLogger("punch.cluster")

HEARTBEAT = 1.0
"""Seconds between a process's lease renewals (and its resync checks)."""
PROCESS_LEASE = 3.0
"""Seconds a process's lease lasts: a process silent this long is taken for dead,
and its names may be registered again elsewhere."""
NAME_LEASE = 3600.0
"""Seconds a name's hash outlives its last renewal (each process renews its
names every third of it): the bound on what a dead process leaves in Redis."""
REDIS_TIMEOUT = 2.0
"""Seconds any one Redis call may take before :class:`ClusterUnavailable`."""
RENEW_BATCH = 1000
"""Names renewed per pipeline."""
INTRODUCE_BATCH = 64
"""Introductions handed over per script call, at most."""
REMOTE_PEERS_CACHED = 1024
"""Remote peers kept parsed, by their registrations' exact bytes (at most about 2 KiB
each): a peer introduced again costs no JSON."""
_LEAVING = "redis introduce: this process is leaving the cluster"

_LIVE = """
local function holder(field)
  return string.match(field, '^([^/]+)/')
end
local leases = {}
local function alive(prefix, process)
  if leases[process] == nil then
    leases[process] = redis.call('EXISTS', prefix .. ':process:' .. process) == 1
  end
  return leases[process]
end
"""
"""Lua helpers every script that reads fields begins with: the process a field
(``{process}/{serial}``) belongs to, and whether its lease is live (asked of
Redis once a process per script call)."""

_CLAIM = (
    _LIVE
    + """
local prefix, field, record, key, family = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] == field then
    -- ours, written before: claimed again after a partition
  elseif not alive(prefix, holder(fields[i])) then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    local held = cjson.decode(fields[i + 1])
    if held.peer_id ~= key or tostring(held.family) == family then
      return {'held', held.peer_id}
    end
  end
end
if ARGV[7] == '1' then
  local bound = redis.call('HGET', KEYS[2], KEYS[3])
  if bound and bound ~= key then
    return {'bound', bound}
  end
  redis.call('HSETNX', KEYS[2], KEYS[3], key)
end
redis.call('HSET', KEYS[1], field, record)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {'ok', ''}
"""
)
"""KEYS: the name's hash, the bound hash, the name. ARGV: prefix, field, record,
peer ID, family, name lease (ms), persist ('1' or '0')."""

_INTRODUCE = (
    _LIVE
    + """
local prefix = ARGV[1]
local out, holders, frames, order = {}, {}, {}, {}
for k = 1, #KEYS do
  local live = {}
  local fields = redis.call('HGETALL', KEYS[k])
  for i = 1, #fields, 2 do
    if alive(prefix, holder(fields[i])) then
      table.insert(live, fields[i])
      table.insert(live, fields[i + 1])
    end
  end
  out[k] = {0, live}
  if #live > 0 then
    local process = holder(live[1])
    holders[k] = process
    if frames[process] == nil then
      frames[process] = {}
      table.insert(order, process)
    end
    table.insert(frames[process], ARGV[k + 1])
  end
end
local receivers = {}
for _, process in ipairs(order) do
  local message = table.concat(frames[process], '\\n')
  receivers[process] = redis.call('PUBLISH', prefix .. ':to:' .. process, message)
end
for k, process in pairs(holders) do
  out[k][1] = receivers[process]
end
return out
"""
)
"""KEYS: the hashes of a batch of names. ARGV: prefix, then each name's forwarded
item (``name\\nbody``). Publishes to each process that holds one of the names (its
first live registration) the items for it, joined by newlines, in one message;
returns, for each name, the number of subscribers that got its item (0: none, or
no live registration) and its live registrations, field then record. One round
trip for the whole batch: the lookups and the hand-overs at once."""

_CONNECTIONS = (
    _LIVE
    + """
local prefix, process, most, delta = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function add(n)
  if redis.call('HINCRBY', KEYS[1], process, n) <= 0 then
    redis.call('HDEL', KEYS[1], process)
  end
end
add(delta)
if delta <= 0 then
  return 1
end
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] == process or alive(prefix, fields[i]) then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if total > most then
  add(-delta)
  return 0
end
return 1
"""
)
"""KEYS: the source's hash, one field a process: its connections from that source.
ARGV: prefix, process, most, +1 or -1, expiry (ms). 0: over ``most`` cluster-wide
(the +1 undone). Fields of dead processes are dropped on the way."""

_RATE = """
local now, window, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= most then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window))
return 1
"""
"""KEYS: the limit's sorted set. ARGV: now (ms), window (ms), most, a unique member."""


@contextlib.asynccontextmanager
async def _closing_quietly() -> AsyncIterator[None]:
    """Around a coredis pub/sub: when cancelled, its cleanup's UNSUBSCRIBE can
    meet its connection already closed (``anyio.ClosedResourceError``, coredis
    6.9); that is no failure of ours, and the cancellation goes on."""
    import anyio

    try:
        yield
    except* anyio.ClosedResourceError:
        if trio.current_effective_deadline() != -math.inf:  # not cancelled: a real loss
            raise


class ClusterUnavailable(PunchError):
    """Redis could not be reached, or did not answer within :data:`REDIS_TIMEOUT` s
    (:func:`punch.serve_rendezvous` raises it when Redis does not answer at start)."""


class NameHeld(Exception):
    """The name is held elsewhere in the cluster (``name-taken``).

    Args:
        peer_id: the key that holds it.
        bound: True if the name is bound to that key for good (``persist_names``),
            False if a connected peer holds it.
    """

    def __init__(self, peer_id: str, bound: bool) -> None:
        super().__init__(peer_id, bound)
        self.peer_id = peer_id
        self.bound = bound


class Registration(Protocol):
    """What the cluster needs of one local registration (the server's ``_Peer``)."""

    name: str
    observed: Endpoint
    host_candidates: tuple[Endpoint, ...]
    certificate: bytes
    peer_id: str
    cluster_field: str | None

    @property
    def nat_facts(self) -> NatFacts | None: ...


@attrs.frozen
class RemotePeer:
    """A peer registered on another process: what an introduction to it needs.

    Attributes:
        name: its name.
        process: the ID of the process that holds its control connection.
        candidates: server-reflexive then host candidates of each of its
            registrations, at most ``MAX_CANDIDATES + 1``.
        certificate: its registered certificate (DER).
        nat_facts: its NAT report, if any.
    """

    name: str
    process: str
    candidates: tuple[Candidate, ...]
    certificate: bytes
    nat_facts: NatFacts | None

    @property
    def observed(self) -> Endpoint:
        """Its first registration's server-reflexive endpoint."""
        return self.candidates[0].endpoint


def _record(peer: Registration) -> str:
    return json.dumps(
        {
            "peer_id": peer.peer_id,
            "family": peer.observed.address.version,
            "observed": _endpoint_to_wire(peer.observed),
            "hosts": [_endpoint_to_wire(e) for e in peer.host_candidates],
            "certificate": peer.certificate.hex(),
            "nat": _nat_to_wire(peer.nat_facts),
        },
        separators=(",", ":"),
    )


def remote_peer(name: str, registrations: list[tuple[str, dict[str, Any]]]) -> RemotePeer:
    """The peer that ``registrations`` (field, decoded record; at least one) make up.

    Raises:
        ValueError, KeyError, TypeError: a record that is not ours.
    """
    observed = [_endpoint_from_wire(r["observed"]) for _, r in registrations]
    hosts = [_endpoint_from_wire(e) for _, r in registrations for e in r["hosts"]]
    first_field, first = registrations[0]
    nat = next((r["nat"] for _, r in registrations if r["nat"] is not None), None)
    return RemotePeer(
        name,
        first_field.split("/", 1)[0],
        introduction_candidates(observed, hosts),
        bytes.fromhex(first["certificate"]),
        None if nat is None else _nat_from_wire(nat),
    )


@functools.lru_cache(maxsize=REMOTE_PEERS_CACHED)
def _remote_peer(name: str, flat: tuple[bytes, ...]) -> RemotePeer:
    """:func:`remote_peer` of the live registrations the introduction script returned
    (field, record, field, record...), parsed once while they stay the same."""
    fields = [(flat[i].decode(), json.loads(flat[i + 1])) for i in range(0, len(flat), 2)]
    return remote_peer(name, fields)


@attrs.define(eq=False)
class _Pending:
    """One introduction waiting for its batch's round trip (:meth:`Cluster.introduce`)."""

    name: str
    item: bytes
    """What goes to the peer's process: ``name\\nbody`` (the frame without its header)."""
    done: trio.Event = attrs.field(factory=trio.Event)
    failure: str | None = None
    receivers: int = 0
    registrations: list[bytes] = attrs.field(factory=list)

    def fail(self, why: str) -> None:
        """Wake its caller with :class:`ClusterUnavailable` (``why``)."""
        self.failure = why
        self.done.set()


@attrs.define(eq=False)
class Cluster:
    """One rendezvous process's part in a cluster sharing a registry in Redis.

    Args:
        url: the Redis server, ``redis://[:password@]host:port/db`` (or
            ``rediss://`` for TLS), as ``coredis.Redis.from_url`` reads it.
        prefix: the prefix of every key and channel (one cluster per prefix).
        persist_names: bind each name to its first key for good, in Redis
            (``punch-rendezvous --persist-names`` for a cluster).
        process: this process's ID, no ``/`` (default: ``PID-RANDOM``, its
            process ID and 48 random bits in hex: an operator reading Redis
            sees which process holds a name, and a restarted process with a
            reused PID still gets an ID of its own).
    """

    url: str
    prefix: str = "punch"
    persist_names: bool = False
    process: str = attrs.field(factory=lambda: f"{os.getpid()}-{secrets.token_hex(6)}")
    redis: coredis.Redis[bytes] | None = attrs.field(default=None, init=False)
    _connections: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    """Our connections per source counted in Redis (kept at 0 until a resync writes it)."""
    _orphans: dict[str, str] = attrs.field(factory=dict, init=False)
    """Fields (to names) of registrations that left while Redis could not be told."""
    _lost: Any = attrs.field(default=None, init=False)
    _scripts: dict[str, Any] = attrs.field(factory=dict, init=False)
    """Each Lua script, loaded once (``EVALSHA``, ``EVAL`` if Redis lost it)."""
    _serial: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    _local: dict[str, Registration] = attrs.field(factory=dict, init=False)
    """Every registration this process has claimed, by field."""
    available: bool = attrs.field(default=True, init=False)
    """False from a lost connection or a failed lease renewal to the next renewed
    lease: calls then fail at once, so a partition costs a registration no wait."""
    resynced: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set (then replaced) each time every local registration was written again."""
    _leaving: bool = attrs.field(default=False, init=False)
    _pending: list[_Pending] = attrs.field(factory=list, init=False)
    """Introductions waiting for the next batch."""
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set when an introduction joins :attr:`_pending`."""
    _dirty: bool = attrs.field(default=False, init=False)
    """A write failed since the last resync: write every registration again."""

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _call(self, what: str, call: Any) -> Any:
        """Await ``call`` (a coroutine) within :data:`REDIS_TIMEOUT` s; while
        :attr:`available` is False, only the lease is tried."""
        import anyio
        import coredis.exceptions

        assert self.redis is not None, "Cluster.run has not started"
        refusal = None
        if self._leaving and what != "leave":
            refusal = "this process is leaving the cluster"
        elif not self.available and what != "lease":
            refusal = "unreachable since the last failed call"
        if refusal is not None:
            if inspect.iscoroutine(call):
                call.close()  # never started
            raise ClusterUnavailable(f"redis {what}: {refusal}")
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                return await call
        except Exception as exc:
            lost = (
                trio.TooSlowError,
                coredis.exceptions.RedisError,
                OSError,
                anyio.ClosedResourceError,
                anyio.BrokenResourceError,
            )
            if not isinstance(exc, lost) and not (self._leaving and isinstance(exc, RuntimeError)):
                raise  # (a RuntimeError: its pool closed as we leave)
            self._dirty = True
            if what == "lease" or not isinstance(exc, trio.TooSlowError):
                # Redis is gone (or silent to our lease): fail fast until the lease is
                # renewed. One slow call alone (a busy process) fails only itself.
                self.available = False
            raise ClusterUnavailable(f"redis {what}: {str(exc) or type(exc).__name__}") from exc

    async def run(
        self,
        deliver: Any,
        lost: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, hold the lease, and hand each introduction that arrives for one of
        our peers to ``deliver(name, introduction, frame)`` (an async callable; ``frame``:
        the introduction's encoding, header and body); until cancelled.
        A registration whose name another process took while Redis could not be
        reached goes to ``lost(registration, NameHeld)`` (an async callable), after
        the partition.

        Started once Redis answered and our channel is subscribed.

        Raises:
            ClusterUnavailable: Redis cannot be reached at start.
        """
        import coredis

        self.redis = coredis.Redis.from_url(
            self.url, connect_timeout=REDIS_TIMEOUT, stream_timeout=None
        )
        scripts = (_CLAIM, _INTRODUCE, _RATE, _CONNECTIONS)
        self._scripts = {lua: self.redis.register_script(lua) for lua in scripts}
        try:
            async with self.redis:
                await self._heartbeat()
                for lua in self._scripts:  # loaded before a burst of first calls
                    await self._call("load", self.redis.script_load(lua))
                async with trio.open_nursery() as nursery:
                    self._lost = partial(nursery.start_soon, lost)
                    await nursery.start(self._subscribe, deliver)
                    nursery.start_soon(self._keep_lease)
                    nursery.start_soon(self._introduce_batches)
                    log.info("cluster: process %s on %s", self.process, self.url)
                    task_status.started()
        finally:
            self._leaving = True  # calls under way or to come: none reaches the closing pool

    async def _heartbeat(self) -> None:
        """Renew our lease; write every registration again if Redis lost it or a write failed."""
        assert self.redis is not None
        lease = self._key("process", self.process)
        old = await self._call(
            "lease", self.redis.set(lease, b"1", px=int(PROCESS_LEASE * 1000), get=True)
        )
        self.available = True
        if (old is None or self._dirty) and (self._local or self._orphans or self._connections):
            log.warning(
                "cluster: claiming %d registration(s) again (%s)",
                len(self._local),
                "our lease was gone" if old is None else "a call failed",
            )
            await self._resync()
            self.resynced.set()
            self.resynced = trio.Event()
        self._dirty = False

    async def _resync(self) -> None:
        """Drop the fields of registrations that left while Redis was away, then claim
        every local one again, one script call each (a name another process took
        meanwhile goes to ``lost``: the first claim in Redis wins)."""
        assert self.redis is not None
        for field, name in list(self._orphans.items()):
            await self._call("resync", self.redis.hdel(self._key("name", name), [field]))
            del self._orphans[field]
        for source, count in list(self._connections.items()):  # zeros: HDEL
            key = self._key("connections", source)
            if count > 0:
                await self._call("resync", self.redis.hset(key, {self.process: count}))
            else:
                await self._call("resync", self.redis.hdel(key, [self.process]))
                del self._connections[source]
        for peer in list(self._local.values()):
            try:
                await self._claim(peer)
            except NameHeld as held:
                assert peer.cluster_field is not None
                del self._local[peer.cluster_field]
                log.warning("cluster: %r was taken elsewhere while Redis was away", peer.name)
                self._lost(peer, held)

    async def _renew(self, registrations: list[Registration]) -> None:
        """Renew these registrations' names' expiry, in one pipeline."""
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for peer in registrations:
                pipe.pexpire(self._key("name", peer.name), int(NAME_LEASE * 1000))

    async def _keep_lease(self) -> None:
        renewed = trio.current_time()
        while True:
            await trio.sleep(HEARTBEAT)
            try:
                await self._heartbeat()
                if trio.current_time() - renewed >= NAME_LEASE / 3:
                    await self._renew_names()
                    renewed = trio.current_time()
            except ClusterUnavailable as exc:
                log.warning("cluster: %s; serving local peers only", exc)

    async def _renew_names(self) -> None:
        batch = list(self._local.values())
        for start in range(0, len(batch), RENEW_BATCH):
            await self._call("renew", self._renew(batch[start : start + RENEW_BATCH]))

    async def _subscribe(
        self, deliver: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read our channel; resubscribe after a lost connection (every
        :data:`HEARTBEAT` s at most, until cancelled)."""
        assert self.redis is not None
        channel = self._key("to", self.process).encode()
        started = False
        async with trio.open_nursery() as deliveries:
            while True:
                try:
                    async with _closing_quietly(), self.redis.pubsub(channels=[channel]) as pubsub:
                        if not started:
                            task_status.started()
                            started = True
                        async for message in pubsub:
                            if message["type"] == "message":
                                data = message["data"]
                                assert isinstance(data, bytes)  # decode_responses is off
                                self._forwarded(data, deliver, deliveries)
                except Exception as exc:  # any failure: resubscribe
                    if not started:
                        raise ClusterUnavailable(f"redis subscribe: {exc}") from exc
                    log.warning("cluster: subscription lost (%s); resubscribing", exc)
                    await trio.sleep(HEARTBEAT)

    def _forwarded(self, data: bytes, deliver: Any, nursery: trio.Nursery) -> None:
        """Hand each introduction of one message (items ``name\\nbody``, joined by
        newlines) to ``deliver``; drop what is not ours."""
        lines = data.split(b"\n")
        if len(lines) % 2:
            log.error("cluster: dropping a malformed forwarded message: %d lines", len(lines))
            return
        for name, body in zip(lines[::2], lines[1::2], strict=True):
            try:
                frame = frame_body(body)
                introduction = decode_body(body)
                if not isinstance(introduction, Introduction):
                    raise ValueError(f"not an introduction: {type(introduction).__name__}")
                peer = name.decode()
            except Exception as exc:  # another process's bug: drop it
                log.error("cluster: dropping a malformed forwarded frame: %s", exc)
                continue
            nursery.start_soon(deliver, peer, introduction, frame)

    async def claim(self, peer: Registration) -> None:
        """Enter ``peer``'s registration in Redis (sets ``peer.cluster_field``).

        Raises:
            NameHeld: another live registration holds its name.
            ClusterUnavailable: Redis did not answer; the registration is
                written at the next successful heartbeat.
        """
        peer.cluster_field = f"{self.process}/{next(self._serial)}"
        self._local[peer.cluster_field] = peer
        try:
            await self._claim(peer)
        except NameHeld:
            del self._local[peer.cluster_field]
            peer.cluster_field = None
            raise

    async def _claim(self, peer: Registration) -> None:
        """Run the claim script for ``peer``'s field.

        Raises:
            NameHeld, ClusterUnavailable: as :meth:`claim`.
        """
        assert peer.cluster_field is not None
        outcome, holder = await self._call(
            "claim",
            self._scripts[_CLAIM](
                keys=[self._key("name", peer.name), self._key("bound"), peer.name],
                args=[
                    self.prefix,
                    peer.cluster_field,
                    _record(peer),
                    peer.peer_id,
                    peer.observed.address.version,
                    int(NAME_LEASE * 1000),
                    "1" if self.persist_names else "0",
                ],
            ),
        )
        if outcome != b"ok":
            raise NameHeld(holder.decode(), outcome == b"bound")

    async def leave(self) -> None:
        """On shutdown: end our lease at once (our names are free elsewhere from
        now, not :data:`PROCESS_LEASE` s later); best effort, at most
        :data:`REDIS_TIMEOUT` s. Registrations released after it stay unwritten."""
        self._leaving = True
        assert self.redis is not None
        try:
            await self._call("leave", self.redis.delete([self._key("process", self.process)]))
        except ClusterUnavailable as exc:
            log.warning("cluster: leaving without a word: %s", exc)

    async def release(self, peer: Registration) -> None:
        """Take ``peer``'s registration out of Redis (best effort).

        Raises:
            ClusterUnavailable: Redis did not answer (the field then goes
                with our lease, or is dropped by the next resync).
        """
        assert self.redis is not None
        field = peer.cluster_field
        if field is None or self._local.pop(field, None) is None or self._leaving:
            return
        try:
            await self._call("release", self.redis.hdel(self._key("name", peer.name), [field]))
        except ClusterUnavailable:
            self._orphans[field] = peer.name  # dropped at the resync
            raise

    async def introduce(self, name: str, introduction: Introduction) -> RemotePeer | None:
        """Hand ``introduction`` to the live process that holds ``name`` and return that
        peer (for the other introduction), in one round trip; None if no live process
        holds it, or the one that does no longer listens (it died, its lease not yet out).

        Introductions asked for while a round trip is under way wait for it, then go
        together in the next (at most :data:`INTRODUCE_BATCH`): one script call and
        one message a process for the lot. Redis writes the published frames to their
        processes before it answers us. A round trip that fails fails those waiting
        too, so none waits longer than :data:`REDIS_TIMEOUT`.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        if self._leaving:
            raise ClusterUnavailable(_LEAVING)
        pending = _Pending(name, name.encode() + b"\n" + encode_frame(introduction)[_HEADER.size :])
        self._pending.append(pending)
        self._wake.set()
        await pending.done.wait()
        if pending.failure is not None:
            raise ClusterUnavailable(pending.failure)
        if not pending.receivers:
            return None
        return _remote_peer(name, tuple(pending.registrations))

    async def _introduce_batches(self) -> None:
        """Run the introduction script for what :meth:`introduce` queued, a batch at a
        time, until cancelled; then fail whatever still waits."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    batch = self._pending[:INTRODUCE_BATCH]
                    del self._pending[:INTRODUCE_BATCH]
                    await self._introduce_batch(batch)
        finally:
            for pending in self._pending:
                pending.fail(_LEAVING)

    async def _introduce_batch(self, batch: list[_Pending]) -> None:
        script = self._scripts[_INTRODUCE]
        keys = [self._key("name", p.name) for p in batch]
        call = script(keys=keys, args=[self.prefix, *(p.item for p in batch)])
        try:
            answers = await self._call("introduce", call)
        except ClusterUnavailable as exc:
            # those queued behind it would wait on the same Redis: they fail with it,
            # so no introduction waits longer than REDIS_TIMEOUT for a stalled Redis
            queued, self._pending = self._pending, []
            for pending in (*batch, *queued):
                pending.fail(str(exc))
            return
        except BaseException:
            for pending in batch:
                pending.fail(_LEAVING)
            raise
        for pending, (receivers, registrations) in zip(batch, answers, strict=True):
            pending.receivers = receivers
            pending.registrations = registrations
            pending.done.set()

    async def allow(self, kind: str, key: str, most: int, now: float) -> bool:
        """Record one event of ``kind`` for ``key`` if fewer than ``most`` happened,
        cluster-wide, in the 60 s before ``now`` (seconds, any clock all processes share).

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        assert self.redis is not None
        script = self._scripts[_RATE]
        allowed = await self._call(
            "rate",
            script(
                keys=[self._key("rate", kind, key)],
                args=[math.floor(now * 1000), 60_000, most, secrets.token_hex(8)],
            ),
        )
        return bool(allowed)

    async def connect(self, source: str, most: int) -> bool:
        """Count one more connection from ``source`` (a :func:`punch._server.source_key`);
        False, and not counted, if that makes more than ``most`` across the cluster.
        Every call must be matched by one :meth:`disconnect` when the connection ends.

        Raises:
            ClusterUnavailable: Redis did not answer (counted here; written at the resync).
        """
        self._connections[source] += 1
        allowed = await self._count(source, most, 1)
        if not allowed:
            self._connections[source] -= 1
        return allowed

    async def disconnect(self, source: str) -> None:
        """Count one connection from ``source`` fewer (after :meth:`connect` allowed it).

        Raises:
            ClusterUnavailable: Redis did not answer (corrected at the resync).
        """
        self._connections[source] -= 1
        await self._count(source, 0, -1)
        if not self._connections[source]:
            del self._connections[source]

    async def _count(self, source: str, most: int, delta: int) -> bool:
        keys = [self._key("connections", source)]
        args = [self.prefix, self.process, most, delta, int(NAME_LEASE * 1000)]
        return bool(await self._call("count", self._scripts[_CONNECTIONS](keys=keys, args=args)))
