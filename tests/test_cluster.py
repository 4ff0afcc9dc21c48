"""Rendezvous servers sharing one registry in a real redis-server (issue 18)."""

from __future__ import annotations

import collections
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import psutil
import pytest
import trio
from netns.scenario import PairRun
from tools.redis import RedisServer

from punch import Host, Identity, PeerStream, open_host
from punch._cluster import HEARTBEAT, INTRODUCE_BATCH, PROCESS_LEASE, REDIS_TIMEOUT, Cluster
from punch._control import ControlChannel
from punch._endpoint import Endpoint, Role
from punch._protocol import ConnectRequest, Error, Introduction, Registered
from punch._server import ServerLimits, serve_rendezvous

from .helpers import raw_client, refused_with, register, send_register

T = TypeVar("T")

if shutil.which("redis-server") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must have redis-server: make netns-deps installs it")
    pytest.skip("no redis-server (make netns-deps installs it)", allow_module_level=True)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@asynccontextmanager
async def cluster(
    redis: RedisServer, count: int = 2, *, members: list[Cluster] | None = None, **options: Any
) -> AsyncIterator[list[Endpoint]]:
    """``count`` rendezvous servers on loopback sharing ``redis`` (each with its own
    :class:`Cluster`, or one of ``members``); cancelled after."""
    members = members if members is not None else [Cluster(redis.url) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        serve = partial(serve_rendezvous, "127.0.0.1", 0, **options)
        yield [await nursery.start(partial(serve, redis=member)) for member in members]
        nursery.cancel_scope.cancel()


async def eventually(attempt: Callable[[], Awaitable[T | None]], timeout: float = 5.0) -> T:
    """``attempt()``'s first non-None result, tried every 50 ms for at most ``timeout`` s
    (what another process does in Redis has no event to wait on here)."""
    with trio.fail_after(timeout):
        while (result := await attempt()) is None:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.05)
    return result


async def test_coredis_runs_on_trio(redis: RedisServer) -> None:
    import coredis

    client = coredis.Redis.from_url(redis.url)
    async with client:
        await client.set(b"key", b"value")
        assert await client.get(b"key") == b"value"
        async with client.pubsub(channels=[b"channel"]) as pubsub:
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
            assert await client.publish(b"channel", b"hello") == 1
            message = await pubsub.get_message(timeout=5)
            assert message is not None
            assert message["data"] == b"hello"


async def test_peers_on_two_servers_are_introduced_with_one_secret(redis: RedisServer) -> None:
    async with (
        cluster(redis) as (a, b),
        raw_client(a, "127.0.0.2") as alice,
        raw_client(b, "127.0.0.3") as bob,
    ):
        assert isinstance(await register(alice, "alice", Endpoint("127.0.0.2", 4000)), Registered)
        assert isinstance(await register(bob, "bob"), Registered)
        await alice.send(ConnectRequest("bob", 7))
        to_alice, to_bob = await alice.receive(), await bob.receive()
        assert isinstance(to_alice, Introduction)
        assert isinstance(to_bob, Introduction)
        assert (to_alice.role, to_bob.role) == (Role.INITIATOR, Role.RESPONDER)
        assert to_alice.request_id == 7
        assert to_bob.request_id is None
        assert to_alice.attempt_id == to_bob.attempt_id
        assert to_alice.secret == to_bob.secret
        assert to_alice.peer_name == "bob"
        assert to_bob.peer_name == "alice"
        assert [c.endpoint.ip for c in to_alice.candidates] == ["127.0.0.3"]
        assert [str(c.endpoint) for c in to_bob.candidates][1:] == ["127.0.0.2:4000"]
        # and back the other way, from the server bob is on
        await bob.send(ConnectRequest("alice", 8))
        assert isinstance(back := await bob.receive(), Introduction)
        assert back.role == Role.INITIATOR
        assert isinstance(await alice.receive(), Introduction)


async def test_a_burst_of_introductions_across_servers_each_reach_the_right_peer(
    redis: RedisServer,
) -> None:
    """More introductions at once than one batch holds (they share script calls and
    messages, :data:`punch._cluster.INTRODUCE_BATCH` at most): each of both sides
    gets its own, with one secret and the right names, in both directions."""
    count = INTRODUCE_BATCH + 16
    async with cluster(redis) as (a, b), AsyncExitStack() as clients:
        here = [await clients.enter_async_context(raw_client(a)) for _ in range(count)]
        there = [await clients.enter_async_context(raw_client(b)) for _ in range(count)]
        for i in range(count):
            host = Endpoint("127.0.0.1", 10000 + i), Endpoint("127.0.0.1", 20000 + i)
            assert isinstance(await register(here[i], f"a{i}", host[0]), Registered)
            assert isinstance(await register(there[i], f"b{i}", host[1]), Registered)
        for i in range(count):  # a0 asks b0, b1 asks a1, ...
            asker, name = (here[i], f"b{i}") if i % 2 == 0 else (there[i], f"a{i}")
            await asker.send(ConnectRequest(name, i + 1))
        for i in range(count):
            asker, target = (here[i], there[i]) if i % 2 == 0 else (there[i], here[i])
            to_asker, to_target = await asker.receive(), await target.receive()
            assert isinstance(to_asker, Introduction)
            assert isinstance(to_target, Introduction)
            assert to_asker.request_id == i + 1
            assert to_asker.secret == to_target.secret
            assert {to_asker.peer_name, to_target.peer_name} == {f"a{i}", f"b{i}"}
            assert to_target.peer_name != to_asker.peer_name
            for to in (to_asker, to_target):  # the other's host candidate: a{i} 10000+i
                port = (10000 if to.peer_name.startswith("a") else 20000) + i
                assert port in {c.endpoint.port for c in to.candidates}


async def test_a_name_is_unique_across_the_cluster(redis: RedisServer) -> None:
    async with cluster(redis) as (a, b), raw_client(a) as first:
        assert isinstance(await register(first, "alice"), Registered)
        async with raw_client(b) as impostor:  # another key
            await send_register(impostor, "alice", identity=Identity.generate())
            assert await refused_with(impostor) == "name-taken"
        async with raw_client(b) as twin:  # the same key over the same family
            await send_register(twin, "alice")
            assert await refused_with(twin) == "name-taken"
        await first.stream.aclose()

        async def register_elsewhere() -> object | None:  # released on close
            async with raw_client(b) as later:
                reply = await register(later, "alice", identity=Identity.generate())
                return reply if isinstance(reply, Registered) else None

        await eventually(register_elsewhere)


async def test_unknown_and_gone_peers_are_unknown_cluster_wide(redis: RedisServer) -> None:
    async with cluster(redis) as (a, b), raw_client(a) as alice, raw_client(b) as bob:
        await register(alice, "alice")
        await register(bob, "bob")
        await alice.send(ConnectRequest("carol", 1))
        assert isinstance(error := await alice.receive(), Error)
        assert error.code == "unknown-peer"
        await bob.stream.aclose()

        async def ask() -> Error | None:  # bob's server releases the name when it sees the close
            await alice.send(ConnectRequest("bob", 2))
            reply = await alice.receive()
            return reply if isinstance(reply, Error) else None

        assert (await eventually(ask)).code == "unknown-peer"


async def test_the_registration_rate_holds_across_servers(redis: RedisServer) -> None:
    limits = ServerLimits(exempt=(), registrations_per_minute=2)
    async with cluster(redis, limits=limits) as (a, b):
        for server, name in ((a, "one"), (b, "two")):
            async with raw_client(server, "127.0.0.9") as client:
                assert isinstance(await register(client, name), Registered)
        async with raw_client(b, "127.0.0.9") as third:
            await send_register(third, "three")
            assert await refused_with(third) == "rate-limited"
        async with raw_client(a, "127.0.0.10") as elsewhere:  # another source is counted apart
            assert isinstance(await register(elsewhere, "four"), Registered)


async def test_connections_per_source_are_counted_across_servers(redis: RedisServer) -> None:
    limits = ServerLimits(exempt=(), max_connections_per_ip=2)
    async with cluster(redis, limits=limits) as (a, b):
        async with raw_client(a, "127.0.0.9") as one, raw_client(b, "127.0.0.9") as two:
            assert isinstance(await register(one, "one"), Registered)
            assert isinstance(await register(two, "two"), Registered)
            async with raw_client(b, "127.0.0.9") as third:
                assert await refused_with(third) == "too-many-connections"
            async with raw_client(a, "127.0.0.10") as elsewhere:  # another source
                assert isinstance(await register(elsewhere, "four"), Registered)
        # both closed: their counts go as the servers see the closes

        async def admitted() -> bool | None:
            async with raw_client(a, "127.0.0.9") as again:
                return True if isinstance(await register(again, "again"), Registered) else None

        await eventually(admitted)


async def test_a_partition_fails_remote_introductions_fast_and_keeps_local_ones(
    redis: RedisServer,
) -> None:
    members = [Cluster(redis.url), Cluster(redis.url)]
    async with (
        cluster(redis, members=members) as (a, b),
        raw_client(a) as alice,
        raw_client(a) as carol,
        raw_client(b) as bob,
    ):
        for channel, name in ((alice, "alice"), (carol, "carol"), (bob, "bob")):
            assert isinstance(await register(channel, name), Registered)
        redis.pause()
        try:
            with trio.fail_after(REDIS_TIMEOUT + 1):
                await alice.send(ConnectRequest("bob", 1))
                error = await alice.receive()
            assert isinstance(error, Error)
            assert error.code == "cluster-unavailable"
            with trio.fail_after(1):  # no Redis call: carol is here
                await alice.send(ConnectRequest("carol", 2))
                assert isinstance(await alice.receive(), Introduction)
                assert isinstance(await carol.receive(), Introduction)

            async def unavailable() -> bool | None:  # once the lease renewal fails too
                return None if members[0].available else True

            await eventually(unavailable, HEARTBEAT + REDIS_TIMEOUT + 1)
            with trio.fail_after(1):  # then every call fails at once
                async with raw_client(a) as dave:
                    assert isinstance(await register(dave, "dave"), Registered)
        finally:
            redis.resume()


async def test_introductions_queued_behind_a_stalled_call_fail_with_it(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops answering: the first introduction's round trip times out after
    REDIS_TIMEOUT, and those queued behind it for the next batch fail with it, not
    one timeout later."""
    in_flight = trio.Event()
    send_batch = Cluster._introduce_batch

    async def observed(self: Cluster, batch: list[Any]) -> None:
        in_flight.set()
        await send_batch(self, batch)

    monkeypatch.setattr(Cluster, "_introduce_batch", observed)
    async with (
        cluster(redis) as (a, b),
        raw_client(b) as bob,
        AsyncExitStack() as clients,
    ):
        askers = [await clients.enter_async_context(raw_client(a)) for _ in range(3)]
        assert isinstance(await register(bob, "bob"), Registered)
        for index, asker in enumerate(askers):
            assert isinstance(await register(asker, f"asker{index}"), Registered)
        redis.pause()
        try:
            codes: list[str] = []

            async def answer(asker: ControlChannel) -> None:
                reply = await asker.receive()
                assert isinstance(reply, Error)
                codes.append(reply.code)

            with trio.fail_after(REDIS_TIMEOUT + 1):
                async with trio.open_nursery() as nursery:
                    await askers[0].send(ConnectRequest("bob", 1))
                    nursery.start_soon(answer, askers[0])
                    await in_flight.wait()  # the first batch is under way: the rest queue
                    for asker in askers[1:]:
                        await asker.send(ConnectRequest("bob", 1))
                        nursery.start_soon(answer, asker)
            assert codes == ["cluster-unavailable"] * 3
        finally:
            redis.resume()


async def test_after_a_redis_restart_the_servers_write_their_peers_again(
    redis: RedisServer,
) -> None:
    clusters = [Cluster(redis.url), Cluster(redis.url)]
    async with trio.open_nursery() as nursery:
        a, b = [
            await nursery.start(partial(serve_rendezvous, "127.0.0.1", 0, redis=c))
            for c in clusters
        ]
        async with raw_client(a) as alice, raw_client(b) as bob:
            await register(alice, "alice")
            await register(bob, "bob")
            resynced = [c.resynced for c in clusters]
            redis.kill()
            redis.start()
            with trio.fail_after(HEARTBEAT * 2 + REDIS_TIMEOUT + 2):
                for event in resynced:
                    await event.wait()
            await alice.send(ConnectRequest("bob", 1))
            assert isinstance(await alice.receive(), Introduction)
            assert isinstance(await bob.receive(), Introduction)
        nursery.cancel_scope.cancel()


async def test_after_a_partition_the_first_claim_in_redis_keeps_the_name(
    redis: RedisServer,
) -> None:
    """Server a cannot reach Redis for a while: carol registers there (unique on a
    only), dave leaves from there, and carol registers on b too with another key.
    When a's lease renews, b's claim stands (a refuses its carol with name-taken)
    and dave's stale record is dropped (his name is free on b)."""
    clusters = [Cluster(redis.url), Cluster(redis.url)]
    async with trio.open_nursery() as nursery:
        a, b = [
            await nursery.start(partial(serve_rendezvous, "127.0.0.1", 0, redis=c))
            for c in clusters
        ]
        async with raw_client(a) as dave:
            assert isinstance(await register(dave, "dave"), Registered)
            clusters[0].available = False  # as after a failed call: the next fail at once
            clusters[0]._dirty = True
        async with raw_client(a) as carol_here, raw_client(b) as carol_there:
            assert isinstance(await register(carol_here, "carol"), Registered)
            other = Identity.generate()
            assert isinstance(await register(carol_there, "carol", identity=other), Registered)
            resynced = clusters[0].resynced
            with trio.fail_after(HEARTBEAT + REDIS_TIMEOUT + 2):
                await resynced.wait()
                assert await refused_with(carol_here) == "name-taken"
            async with raw_client(b) as new_dave:
                assert isinstance(await register(new_dave, "dave", identity=other), Registered)
        nursery.cancel_scope.cancel()


async def test_a_malformed_forwarded_frame_is_dropped(redis: RedisServer) -> None:
    import coredis

    async with cluster(redis) as (a, b), raw_client(a) as alice, raw_client(b) as bob:
        await register(alice, "alice")
        await register(bob, "bob")
        async with coredis.Redis.from_url(redis.url) as client:
            channels = await client.pubsub_channels(b"punch:to:*")
            assert len(channels) == 2
            for channel in channels:
                for garbage in (b"bob\n{", b"\xff\xfe", b"bob\n" + b'{"type":"keepalive"}'):
                    assert await client.publish(channel, garbage) == 1
        await alice.send(ConnectRequest("bob", 1))  # both servers still introduce
        assert isinstance(await alice.receive(), Introduction)
        assert isinstance(await bob.receive(), Introduction)


async def test_a_killed_servers_peers_register_again_and_meet(redis: RedisServer) -> None:
    """SIGKILL one server (no goodbye, no release): its host reconnects to the next
    rendezvous address, whose claim succeeds once the dead process's lease runs out,
    within 2 x the keepalive interval."""
    doomed, survivor = PairRun(), PairRun()
    args = ("--probe-port", "off", "--redis", redis.url, "-q")
    a = Endpoint.parse(doomed.start_rendezvous([], "127.0.0.1:0", *args))
    b = Endpoint.parse(survivor.start_rendezvous([], "127.0.0.1:0", *args))
    try:
        async with (
            open_host("alice", rendezvous=[a, b]) as alice,
            open_host("bob", rendezvous=[b]) as bob,
        ):
            assert alice.rendezvous == a
            keepalive = ServerLimits().idle_timeout / 3
            doomed.processes[-1].kill()
            killed = trio.current_time()

            async def moved() -> bool | None:
                await alice.wait_registered()
                return True if alice.rendezvous == b else None

            await eventually(moved, 2 * keepalive)
            assert trio.current_time() - killed >= PROCESS_LEASE - HEARTBEAT  # the lease held it
            await _meet(alice, bob, 2 * keepalive)
            assert trio.current_time() - killed < 2 * keepalive
    finally:
        doomed.close()
        survivor.close()


async def _meet(initiator: Host, responder: Host, timeout: float) -> None:
    """``initiator`` connects to ``responder`` (registered again, wherever it is now)."""
    accepted: list[PeerStream] = []

    async def accept() -> None:
        accepted.append(await responder.accept())

    with trio.fail_after(timeout):
        async with trio.open_nursery() as pair:
            pair.start_soon(accept)
            stream = await initiator.connect(responder.name)
    async with stream, accepted[0]:
        assert stream.peer_name == responder.name


def free_port() -> int:
    """A loopback port no one listens on now (the kernel's pick, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Pair = tuple[str, ControlChannel, str, ControlChannel]
"""One pair of the load: its label, the asker, the target's name, the target."""
LOAD_ROUNDS = 2000
"""At most this many rounds of the load (one introduction a pair each, then 20 ms)."""


async def _ask(asker: ControlChannel, name: str, target: ControlChannel) -> str:
    """One introduction, within 2 s (an answer, never a hang): ``introduced`` (both
    got it, with one secret), the error code the asker got, or which side's
    connection is gone."""
    with trio.fail_after(2):
        try:
            await asker.send(ConnectRequest(name, 1))
            answer = await asker.receive()
        except trio.BrokenResourceError:
            answer = None
        if answer is None:
            return "asker lost"
        if isinstance(answer, Error):
            return answer.code
        assert isinstance(answer, Introduction)
        try:
            other = await target.receive()
        except trio.BrokenResourceError:
            other = None
        if other is None:
            return "target lost"
        assert isinstance(other, Introduction)
        assert other.secret == answer.secret
        return "introduced"


async def _load(
    pairs: list[Pair], killed: trio.Event, warm: trio.Event, done: trio.Event
) -> collections.Counter[tuple[str, bool, str]]:
    """Each pair asks for an introduction each round, 20 ms apart, until ``done``;
    ``warm`` is set once every pair was introduced 3 times. Counts (label, after
    the kill, outcome). A pair stops at its first failure, which only a pair with
    a peer on the killed worker may have, and only once ``killed`` is set."""
    seen: collections.Counter[tuple[str, bool, str]] = collections.Counter()
    live = list(pairs)
    for round_ in range(LOAD_ROUNDS):
        if done.is_set():
            break
        for pair in list(live):
            label, asker, name, target = pair
            outcome = await _ask(asker, name, target)
            seen[label, killed.is_set(), outcome] += 1
            if outcome != "introduced":
                assert "victim" in label, (label, outcome)
                assert killed.is_set(), (label, outcome)
                live.remove(pair)
        if round_ == 2:
            warm.set()
        await trio.sleep(0.02)  # pacing, not synchronisation: a steady load
    return seen


async def test_workers_share_one_port_and_a_worker_killed_under_load_loses_only_its_peers(
    redis: RedisServer,
) -> None:
    """``--workers 2`` behind one port, under a load of introductions within and
    across the workers. SIGKILL the worker that holds alice: pairs on the other
    worker keep being introduced; pairs with a peer on the dead one fail with a
    closed connection or ``unknown-peer``, never a hang; alice registers again and
    meets bob within 2 x the keepalive interval; the supervisor replaces the
    worker, and SIGTERM stops them all."""
    port = free_port()
    run = PairRun()
    args = ("--probe-port", "off", "--redis", redis.url, "--workers", "2", "-q")
    limit = ("--introductions-per-minute", "100000")
    try:
        assert run.start_rendezvous([], f"127.0.0.1:{port}", *args, *limit) == f"127.0.0.1:{port}"
        supervisor = run.processes[-1]
        workers = psutil.Process(supervisor.pid).children()
        assert len(workers) == 2
        rendezvous = Endpoint("127.0.0.1", port)
        import coredis

        async def worker_of(name: str) -> int:
            async with coredis.Redis.from_url(redis.url) as client:
                (field,) = await client.hkeys(f"punch:name:{name}")
            return int(field.split(b"-")[0])

        async with (
            open_host("alice", rendezvous=rendezvous) as alice,
            open_host("bob", rendezvous=rendezvous) as bob,
            AsyncExitStack() as clients,
        ):
            victim = psutil.Process(await worker_of("alice"))
            assert victim in workers
            on: dict[bool, list[tuple[str, ControlChannel]]] = {True: [], False: []}
            for index in range(64):  # the kernel's hash spreads them: about 8 to 10
                channel = await clients.enter_async_context(raw_client(rendezvous))
                assert isinstance(await register(channel, f"load{index}"), Registered)
                on[await worker_of(f"load{index}") == victim.pid].append((f"load{index}", channel))
                if min(map(len, on.values())) >= 4:
                    break
            assert min(map(len, on.values())) >= 4, "64 connections all but went to one worker"
            (s0, s1, s2, s3), (v0, v1, v2, v3) = on[False][:4], on[True][:4]
            pairs: list[Pair] = [
                ("survivor", s0[1], *s1),
                ("survivor to victim", s2[1], *v0),
                ("victim to survivor", v1[1], *s3),
                ("victim", v2[1], *v3),
            ]
            killed, warm, done = trio.Event(), trio.Event(), trio.Event()
            seen: collections.Counter[tuple[str, bool, str]] = collections.Counter()

            async def load() -> None:
                seen.update(await _load(pairs, killed, warm, done))

            keepalive = ServerLimits().idle_timeout / 3
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                await warm.wait()
                victim.kill()  # no goodbye: alice reconnects to the port, to any worker
                killed.set()
                at = trio.current_time()

                async def both_elsewhere() -> bool | None:  # bob too, if he was on it
                    pids = {await worker_of(name) for name in ("alice", "bob")}
                    return None if victim.pid in pids else True

                await eventually(both_elsewhere, 2 * keepalive)
                await _meet(alice, bob, 2 * keepalive)
                assert trio.current_time() - at < 2 * keepalive
                done.set()
            for label, *_ in pairs:  # each was introduced before the kill
                assert seen[label, False, "introduced"] >= 3, seen
            assert seen["survivor", True, "introduced"] >= 10, seen  # and on after it
            assert set(seen) <= {
                (label, after, outcome)
                for label, *_ in pairs
                for after in (False, True)
                for outcome in ("introduced", "unknown-peer", "asker lost", "target lost")
            }, seen

        async def replaced() -> bool | None:
            children = {p.pid for p in psutil.Process(supervisor.pid).children()}
            return True if len(children) == 2 and victim.pid not in children else None

        await eventually(replaced, 10)
        supervisor.terminate()
        assert supervisor.wait(timeout=15) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        run.close()
