"""Rendezvous scale-out on loopback (issue 18): workers sharing one registry in Redis.

Three figures, each against real processes (``punch rendezvous --redis`` and
``--workers N``, a real ``redis-server`` from :mod:`tools.redis`), the load
from this process with plain sockets as in :mod:`benchmarks.capacity`:

- introductions per second with 1, 2 and 4 workers (pairs land on workers
  by the kernel's ``SO_REUSEPORT`` hash, so with N workers about (N-1)/N of
  them are introduced across processes, through Redis);
- the skew between the two introductions of one attempt when the two peers
  sit on different workers: one attempt at a time, both sockets read by one
  ``select`` loop, so both arrival times come from one clock;
- memory per idle peer per process: the workers' RSS growth over the peers
  registered, divided by their number.

Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from tools.redis import RedisServer

from punch._protocol import ConnectRequest, Introduction, decode_body, encode_frame

from . import capacity

SERVER = [sys.executable, "-m", "punch", "rendezvous", *capacity.SERVER_ARGS, "--probe-port", "off"]
SKEW_TIMEOUT = 5.0
"""Seconds one attempt's two introductions may take to arrive."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _argv(redis: RedisServer, workers: int) -> list[str]:
    """One ``--redis`` process, or a supervisor of ``workers`` on a fixed port."""
    argv = [*SERVER, "--redis", redis.url]
    if workers == 1:
        return argv
    return [*argv, "--listen", f"127.0.0.1:{_free_port()}", "--workers", str(workers)]


def _processes(server: Any) -> list[psutil.Process]:
    """The processes that serve: the workers, or the one server."""
    return psutil.Process(server.pid).children() or [psutil.Process(server.pid)]


def _stop(server: Any) -> None:
    """Kill the workers, then the supervisor (or the one server)."""
    for process in psutil.Process(server.pid).children():
        process.kill()
    capacity.stop(server)


def _cpu(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def introductions(workers: int, pairs: int, seconds: float) -> dict[str, Any]:
    """As :func:`benchmarks.capacity.introductions`, against ``workers`` workers, every
    pair split over two of them (each requester on one worker asks for a responder on
    the next): every introduction goes through Redis, the worst case and the one that
    scale-out must carry. One worker: every pair on it."""
    with RedisServer() as redis:
        server, address = capacity.start(_argv(redis, workers))
        socks: list[socket.socket] = []
        try:
            names = [f"p{i}" for i in range(2 * pairs)]
            socks = capacity.register(address, names, capacity.sources())
            partner = _split(socks, names, _processes_of(redis, names), pairs)
            serving = _processes(server)
            assert redis.process is not None
            store = [psutil.Process(redis.process.pid)]
            before, stored = _cpu(serving), _cpu(store)
            figures = capacity.pump(partner, socks, seconds)
            spent = seconds + capacity.WARM_UP
            figures["server_cpu"] = (_cpu(serving) - before) / spent
            figures["redis_cpu"] = (_cpu(store) - stored) / spent
            figures["workers"] = workers
            figures["pairs"] = len(partner)
            return figures
        finally:
            for sock in socks:
                sock.close()
            _stop(server)


def _split(
    socks: list[socket.socket], names: list[str], where: list[bytes], pairs: int
) -> dict[socket.socket, str]:
    """Up to ``pairs`` requesters, each paired with a peer on the next worker (with
    one worker: the next peer); no peer in two pairs."""
    by_worker: dict[bytes, list[int]] = {}
    for index, worker in enumerate(where):
        by_worker.setdefault(worker, []).append(index)
    lists = list(by_worker.values())
    if len(lists) == 1:
        (only,) = lists
        return {socks[only[i]]: names[only[i + 1]] for i in range(0, 2 * pairs, 2)}
    partner: dict[socket.socket, str] = {}
    half = min(map(len, lists)) // 2
    for k, mine in enumerate(lists):
        theirs = lists[(k + 1) % len(lists)]
        for i in range(half):  # the first half of mine ask the second half of theirs
            partner[socks[mine[i]]] = names[theirs[half + i]]
    return dict(list(partner.items())[:pairs])


def skew(attempts: int) -> dict[str, Any]:
    """Median and p95 skew (seconds) between an attempt's two introductions, peers on
    different workers of two; also, for scale, the same with both on one process."""
    with RedisServer() as redis:
        server, address = capacity.start(_argv(redis, 2))
        socks: list[socket.socket] = []
        try:
            where = capacity.sources()
            socks = capacity.register(address, [f"k{i}" for i in range(64)], where)
            process = _processes_of(redis, [f"k{i}" for i in range(64)])
            first = process[0]
            apart = next(i for i in range(64) if process[i] != first)
            together = next(i for i in range(1, 64) if process[i] == first)
            return {
                "across": _skews(socks[0], socks[apart], f"k{apart}", attempts),
                "within": _skews(socks[0], socks[together], f"k{together}", attempts),
            }
        finally:
            for sock in socks:
                sock.close()
            _stop(server)


def _processes_of(redis: RedisServer, names: list[str]) -> list[bytes]:
    """The process each name is registered on, from the registry's hash fields."""
    import coredis

    async def read() -> list[bytes]:
        async with coredis.Redis.from_url(redis.url) as client:
            fields = [await client.hkeys(f"punch:name:{name}") for name in names]
        return [next(iter(f)).split(b"/")[0] for f in fields]

    return asyncio.run(read())


def _registered(redis: RedisServer, names: list[str]) -> int:
    """How many of ``names`` the registry holds (one ``EXISTS`` call)."""
    import coredis

    async def count() -> int:
        async with coredis.Redis.from_url(redis.url) as client:
            return int(await client.exists([f"punch:name:{name}" for name in names]))

    return asyncio.run(count())


def _skews(asker: socket.socket, target: socket.socket, name: str, attempts: int) -> dict[str, Any]:
    """``attempts`` introductions one at a time: |arrival at asker - arrival at target|."""
    selector = selectors.DefaultSelector()
    for sock in (asker, target):
        sock.setblocking(True)
        selector.register(sock, selectors.EVENT_READ)
    samples = []
    try:
        for attempt in range(attempts):
            asker.sendall(encode_frame(ConnectRequest(name, attempt + 1)))
            arrived: dict[socket.socket, float] = {}
            deadline = time.monotonic() + SKEW_TIMEOUT
            while len(arrived) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("an introduction did not arrive")
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    now = time.monotonic()
                    if not isinstance(decode_body(capacity.read_frame(sock)), Introduction):
                        raise RuntimeError("not an introduction")
                    arrived[sock] = now
            samples.append(abs(arrived[asker] - arrived[target]))
    finally:
        selector.close()
    return {
        "median": statistics.median(samples),
        "p95": statistics.quantiles(samples, n=20, method="inclusive")[-1],
        "attempts": attempts,
    }


def idle_memory(workers: int, peers: int) -> dict[str, Any]:
    """RSS growth per idle peer per process: ``peers`` registered over ``workers``
    workers after :data:`benchmarks.capacity.BATCH` first ones (so the fixed costs
    of a process's first connections, Redis's included, are left out)."""
    capacity.raise_fd_limit(peers + capacity.BATCH + capacity.FD_SPARE)
    with RedisServer() as redis:
        server, address = capacity.start(_argv(redis, workers))
        where = capacity.sources()
        held: list[socket.socket] = []
        try:
            serving = _processes(server)
            held += capacity.register(address, [f"w{i}" for i in range(capacity.BATCH)], where)
            before = {p.pid: p.memory_info().rss for p in serving}
            swept, names = time.monotonic(), []
            while len(held) < peers + capacity.BATCH:
                names += [f"p{len(held) + i}" for i in range(capacity.BATCH)]
                held += capacity.register(address, names[-capacity.BATCH :], where)
                swept = capacity.keep_alive(held, swept)
            grown = sum(p.memory_info().rss - before[p.pid] for p in serving)
            if _registered(redis, names) != len(names):  # none dropped as idle meanwhile
                raise RuntimeError("a peer's registration was gone before the reading")
            return {"workers": workers, "peers": peers, "per_peer": grown / peers}
        finally:
            for sock in held:
                sock.close()
            _stop(server)


WORKERS = (1, 2, 4)
SPEEDUP_TARGET = 1.7
"""Introductions/s at 2 workers over 1 (issue 18, on 2 cores)."""
SKEW_TARGET = 0.002
"""Seconds: the median skew between an attempt's introductions across workers."""
MEMORY_TARGET = 4096
"""Bytes per idle peer per process."""


def run(pairs: int, seconds: float, attempts: int, peers: int, rounds: int) -> dict[str, Any]:
    """Every figure of this module, as one JSON-able dict.

    The speedup of 2 workers over 1 is the median of ``rounds`` paired rounds (1
    worker, then 2, then 1 again...), each ratio from figures taken a few seconds
    apart; ``introductions`` holds the median round's pair (and the 4 workers). One
    1-worker figure moved 4,002-4,884/s between two runs a minute apart (2026-12-04),
    so a ratio of single runs said more about the minute than the workers.
    """
    paired = [[introductions(w, pairs, seconds) for w in (1, 2)] for _ in range(rounds)]
    speedups = [two["per_second"] / one["per_second"] for one, two in paired]
    middle = paired[speedups.index(statistics.median_low(speedups))]
    return {
        "introductions": [*middle, *(introductions(w, pairs, seconds) for w in WORKERS[2:])],
        "speedups": speedups,
        "skew": skew(attempts),
        "memory": [idle_memory(w, peers) for w in (1, 2)],
    }


def _baseline(workers: int, speedups: list[float], embedded: float) -> str:
    """The baseline column of the ``workers`` row."""
    if workers == 1:
        return f"no Redis {embedded:,.0f}/s"
    if workers == 2 and len(speedups) > 1:
        spread = f"{min(speedups):.2f}-{max(speedups):.2f}"
        return f"1 worker; median of {len(speedups)} paired rounds, {spread}"
    return "1 worker"


def rows(
    figures: dict[str, Any] | None, embedded: float, verdict: Callable[[bool], str]
) -> list[tuple[str, ...]]:
    """The benchmark table's rows for these figures (none for a run before issue 18);
    ``embedded``: introductions/s of one process without Redis, same run; ``verdict``
    words a target's outcome."""
    if figures is None:
        return []
    by = {f["workers"]: f for f in figures["introductions"]}
    one = by[1]["per_second"]
    speedups = figures.get("speedups", [by[2]["per_second"] / one])  # one round before 12-04
    speedup = statistics.median_low(speedups)
    out = [
        (
            f"rendezvous --redis: introductions/s, {w} worker{'s' if w > 1 else ''}"
            f"{', every pair across two' if w > 1 else ''} "
            f"(CPU in cores: server {by[w]['server_cpu']:.2f}, Redis {by[w]['redis_cpu']:.2f}, "
            f"load {by[w]['client_cpu']:.2f}, of 2)",
            f"{by[w]['per_second']:,.0f}/s",
            _baseline(w, speedups, embedded),
            f"{speedup if w == 2 else by[w]['per_second'] / (one if w > 1 else embedded):.2f}",
            f">= {SPEEDUP_TARGET}: {verdict(speedup >= SPEEDUP_TARGET)}" if w == 2 else "reported",
        )
        for w in WORKERS
    ]
    across, within = figures["skew"]["across"], figures["skew"]["within"]
    out.append(
        (
            f"skew between an attempt's two introductions, peers on two workers "
            f"({across['attempts']} attempts)",
            f"median {across['median'] * 1000:.2f} ms, p95 {across['p95'] * 1000:.2f} ms",
            f"both on one worker: median {within['median'] * 1000:.2f} ms",
            "",
            f"median <= {SKEW_TARGET * 1000:.0f} ms: {verdict(across['median'] <= SKEW_TARGET)}",
        )
    )
    for m in figures["memory"]:
        out.append(
            (
                f"memory per idle peer per process, {m['peers']:,} peers on {m['workers']} "
                f"--redis worker{'s' if m['workers'] > 1 else ''}",
                f"{m['per_peer'] / 1024:.1f} KiB",
                "",
                "",
                f"<= {MEMORY_TARGET // 1024} KiB: {verdict(m['per_peer'] <= MEMORY_TARGET)}",
            )
        )
    return out
