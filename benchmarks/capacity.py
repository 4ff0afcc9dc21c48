"""Rendezvous capacity on loopback: idle peers held (RSS per peer), and introductions per second.

The server is the real ``punch rendezvous`` process; the load comes from this
process with plain non-blocking sockets (no trio), from source addresses
spread over 127.0.0.0/8 so that neither port space nor per-IP limits bind.
Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from punch import Identity
from punch._host import signed_register
from punch._protocol import _HEADER as HEADER
from punch._protocol import (
    Challenge,
    ConnectRequest,
    Introduction,
    Keepalive,
    Registered,
    decode_body,
    encode_frame,
)

KEEPALIVE_EVERY = 10.0
"""Seconds between keepalive sweeps over every idle peer (the server drops at 45 s)."""
BATCH = 1000
"""Connections opened, then registered, per step (below the listen backlog)."""
REPLY_TIMEOUT = 30.0
IDENTITY = Identity.generate()
"""One key signs every idle peer's Register (a name per connection, one key for all)."""
SERVER_ARGS = ["--max-peers", "1000000", "--introductions-per-minute", "100000000", "--quiet"]


FD_SPARE = 2000
"""Descriptors left over for the interpreters themselves."""


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE toward ``needed`` (this process and the server it starts).

    Root may raise the hard limit; a container without ``CAP_SYS_RESOURCE``
    may not, and then the soft limit goes up to the hard one.

    Returns:
        the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def sources() -> Iterator[str]:
    """127.1.0.1, 127.1.0.2, ...: 250 connections each, then the next address."""
    for x in range(256):
        for y in range(1, 255):
            for _ in range(250):
                yield f"127.1.{x}.{y}"


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS``, proc(5))."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (``/proc/PID/stat`` fields 14, 15)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(argv: list[str]) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    """Start a server that prints ``ip:port`` on its first line; return it and the address."""
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert server.stdout is not None
    try:
        ip, port = server.stdout.readline().strip().rsplit(":", 1)
    except ValueError:
        stop(server)
        raise RuntimeError(f"{argv[:4]}: no address printed (port taken?)") from None
    return server, (ip, int(port))


def stop(server: subprocess.Popen[str]) -> None:
    """Kill the server and whatever it started (``--workers``): its own session, so
    its own process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


def read_frame(sock: socket.socket) -> bytes:
    """One whole frame body from a blocking socket."""
    header = _exactly(sock, HEADER.size)
    return _exactly(sock, HEADER.unpack(header)[2])


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def register(
    address: tuple[str, int], names: list[str], where: Iterator[str]
) -> list[socket.socket]:
    """Connect and register ``names`` (one connection each), all replies read."""
    socks = []
    for _ in names:
        sock = socket.socket()
        sock.settimeout(REPLY_TIMEOUT)
        sock.bind((next(where), 0))
        sock.connect(address)
        socks.append(sock)
    for sock, name in zip(socks, names, strict=True):
        challenge = decode_body(read_frame(sock))
        if not isinstance(challenge, Challenge):
            raise RuntimeError(f"expected a Challenge, got {challenge}")
        sock.sendall(encode_frame(signed_register(IDENTITY, challenge, name)))
    for sock in socks:
        reply = decode_body(read_frame(sock))
        if not isinstance(reply, Registered):
            raise RuntimeError(f"registration refused: {reply}")
    return socks


def keep_alive(held: list[socket.socket], swept: float) -> float:
    """A Keepalive on every ``held`` connection once :data:`KEEPALIVE_EVERY` seconds
    have passed since ``swept`` (monotonic), so the server drops none as idle (its
    idle timeout: 45 s by default); returns when it last swept."""
    if time.monotonic() - swept <= KEEPALIVE_EVERY:
        return swept
    for sock in held:
        sock.sendall(_KEEPALIVE)
    return time.monotonic()


_KEEPALIVE = encode_frame(Keepalive())


def register_pairs(
    address: tuple[str, int], pairs: int, where: Iterator[str]
) -> tuple[list[socket.socket], list[socket.socket]]:
    """``pairs`` requesters ``r0``... and as many responders ``s0``..., registered."""
    requesters = register(address, [f"r{i}" for i in range(pairs)], where)
    return requesters, register(address, [f"s{i}" for i in range(pairs)], where)


def idle_peers(milestones: tuple[int, ...]) -> dict[str, Any]:
    """Register peers up to each milestone, with keepalives; the server's RSS at each.

    Milestones beyond what the descriptor limit allows (one descriptor per
    peer on each side) are replaced by the most it allows.
    """
    limit = raise_fd_limit(max(milestones) + FD_SPARE) - FD_SPARE
    reachable = [m for m in milestones if m <= limit]
    if len(reachable) < len(milestones):
        reachable.append(limit)
    milestones = tuple(reachable)
    server, address = start([sys.executable, "-m", "punch", "rendezvous", *SERVER_ARGS])
    held: list[socket.socket] = []
    try:
        time.sleep(0.5)  # let the interpreter finish starting before the baseline reading
        baseline = rss(server.pid)
        where, swept, started = sources(), time.monotonic(), time.monotonic()
        points = []
        for target in milestones:
            while len(held) < target:
                count = min(BATCH, target - len(held))
                names = [f"p{len(held) + i}" for i in range(count)]
                held += register(address, names, where)
                swept = keep_alive(held, swept)
            size = rss(server.pid)
            points.append(
                {
                    "peers": target,
                    "rss": size,
                    "per_peer": (size - baseline) / target,
                    "elapsed": time.monotonic() - started,
                }
            )
        if server.poll() is not None:
            raise RuntimeError("the rendezvous died under load")
        return {"baseline_rss": baseline, "points": points, "fd_limit": limit + FD_SPARE}
    finally:
        for sock in held:
            sock.close()
        stop(server)


class Pump:
    """Reads whole frames from many non-blocking sockets; buffers survive between runs."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytearray] = {}
        for sock in socks:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.buffers[sock] = bytearray()

    def run(self, seconds: float, on_frame: Callable[[socket.socket, bytes], None]) -> None:
        """For ``seconds``, call ``on_frame(sock, body)`` for each frame that arrives."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed a connection")
                buffer = self.buffers[sock]
                buffer += data
                while len(buffer) >= HEADER.size:
                    end = HEADER.size + HEADER.unpack_from(buffer)[2]
                    if len(buffer) < end:
                        break
                    on_frame(sock, bytes(buffer[HEADER.size : end]))
                    del buffer[:end]

    def close(self) -> None:
        self.selector.close()


def introductions(pairs: int, seconds: float) -> dict[str, Any]:
    """``pairs`` requesters each asking for its partner again as soon as it is introduced."""
    raise_fd_limit(4 * pairs + 1000)
    server, address = start([sys.executable, "-m", "punch", "rendezvous", *SERVER_ARGS])
    try:
        cpu = cpu_seconds(server.pid)
        figures = pump_introductions(address, pairs, seconds)
        return figures | {"server_cpu": (cpu_seconds(server.pid) - cpu) / (seconds + WARM_UP)}
    finally:
        stop(server)


WARM_UP = 1.0
"""Seconds of introductions before the measured ones."""


def pump_introductions(address: tuple[str, int], pairs: int, seconds: float) -> dict[str, Any]:
    """Register ``pairs`` pairs at ``address`` and :func:`pump` introductions between them."""
    socks: list[socket.socket] = []
    try:
        requesters, responders = register_pairs(address, pairs, sources())
        socks = requesters + responders
        return pump({sock: f"s{i}" for i, sock in enumerate(requesters)}, socks, seconds)
    finally:
        for sock in socks:
            sock.close()


_INTRODUCTION = b'{"type":"introduction",'
_ERROR = b'{"type":"error",'


def pump(
    partner: dict[socket.socket, str], socks: list[socket.socket], seconds: float
) -> dict[str, Any]:
    """Each requester (a key of ``partner``) asks for its partner again as soon as it
    is answered: introductions per second over ``seconds``, after :data:`WARM_UP` s.
    An ``Error`` answer (a cluster's ``cluster-unavailable``) is counted, not an
    introduction, and asked again."""
    done, errors = [0], [0]

    def on_frame(sock: socket.socket, body: bytes) -> None:
        # A frame's type by its first key (punch's encoder writes it first), not a full
        # decode: the load's CPU is the server's to use on this 2-core machine.
        if sock in partner:
            if body.startswith(_ERROR):
                errors[0] += 1
            elif not body.startswith(_INTRODUCTION):
                raise RuntimeError(f"not an introduction: {body[:200]!r}")
            else:
                done[0] += 1
            sock.send(encode_frame(ConnectRequest(partner[sock], 1)))

    for sock, target in partner.items():
        sock.sendall(encode_frame(ConnectRequest(target, 1)))
    reader = Pump(socks)
    reader.run(WARM_UP, on_frame)
    done[0], errors[0], client = 0, 0, time.process_time()
    reader.run(seconds, on_frame)
    reader.close()
    return {
        "per_second": done[0] / seconds,
        "errors_per_second": errors[0] / seconds,
        "client_cpu": (time.process_time() - client) / seconds,
    }


ACCEPT_AND_CLOSE = """
from functools import partial
import trio
async def close(stream):
    await stream.aclose()
async def main():
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, close, 0, host="127.0.0.1"))
        ip, port = listeners[0].socket.getsockname()[:2]
        print(f"{ip}:{port}", flush=True)
trio.run(main)
"""


def accept_and_close(concurrency: int, seconds: float) -> dict[str, Any]:
    """The limit: a bare trio ``serve_tcp`` that closes each connection, under the same client."""
    server, address = start([sys.executable, "-c", ACCEPT_AND_CLOSE])
    where = sources()
    selector = selectors.DefaultSelector()
    done = 0

    def dial() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((next(where), 0))
        sock.connect_ex(address)
        selector.register(sock, selectors.EVENT_READ)  # readable: the server's FIN

    try:
        for _ in range(concurrency):
            dial()
        cpu, client = cpu_seconds(server.pid), time.process_time()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                sock.close()
                done += 1
                dial()
        return {
            "per_second": done / seconds,
            "server_cpu": (cpu_seconds(server.pid) - cpu) / seconds,
            "client_cpu": (time.process_time() - client) / seconds,
        }
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        stop(server)


RELAY_UNLIMITED = (
    "--relay",
    "--relay-rate",
    "1T",
    "--relay-max-bytes-per-circuit",
    "1T",
    "--relay-max-bytes-per-peer-hour",
    "1T",
)
"""The relay with no byte or rate bound: what is measured is the splice itself."""
RELAY_ARGS = [*RELAY_UNLIMITED, "--relay-port", "0", "--relay-bind-timeout", "60"]
RELAY_MEMORY_TARGET = 2 * 65536
"""Bytes of RSS per relayed stream (issue 17): two 64 KiB user-space reads, one a
direction, the most a read-and-write copy would hold."""
POUR_ROUNDS = 64
"""Sends of 64 KiB per relayed stream, at most, into readers that never read."""


def relay_memory(circuits: int) -> dict[str, Any]:
    """RSS of the real rendezvous with its relay: per relayed stream bound and idle, and
    per stream once its writer has filled every buffer toward a reader that never reads
    (issue 17: back-pressure, never a growing buffer; :data:`RELAY_MEMORY_TARGET`)."""
    from punch import Role
    from punch._protocol import Bind, Bound, RelayGrant
    from punch._relay import CHUNK, bind_proof

    raise_fd_limit(8 * circuits + 1000)
    server, address = start(
        [sys.executable, "-m", "punch", "rendezvous", *SERVER_ARGS, *RELAY_ARGS]
    )
    where = sources()
    socks: list[socket.socket] = []
    try:
        requesters, responders = register_pairs(address, circuits, where)
        socks = requesters + responders
        grants: list[tuple[RelayGrant, Role, socket.socket]] = []
        for i, (asker, target) in enumerate(zip(requesters, responders, strict=True)):
            asker.sendall(encode_frame(ConnectRequest(f"s{i}", 1, 0.0)))
            for sock, role in ((asker, Role.INITIATOR), (target, Role.RESPONDER)):
                introduction = decode_body(read_frame(sock))
                if not isinstance(introduction, Introduction) or introduction.relay is None:
                    raise RuntimeError(f"no relay grant: {introduction}")
                grants.append((introduction.relay, role, sock))
        before = rss(server.pid)
        ends = []
        for grant, role, _ in grants:
            end = socket.socket()
            end.settimeout(REPLY_TIMEOUT)
            end.bind((next(where), 0))
            end.connect(grant.endpoint.sockaddr())
            end.sendall(encode_frame(Bind(grant.ticket, role, bind_proof(grant.key, role))))
            ends.append(end)
        socks += ends
        for end in ends:
            if not isinstance(decode_body(read_frame(end)), Bound):
                raise RuntimeError("a bind was refused")
        bound = rss(server.pid)
        writers = ends[0::2]  # each initiator pours; its responder never reads
        for end in writers:
            end.setblocking(False)
        poured = 0
        deadline = time.monotonic() + 30
        for _ in range(POUR_ROUNDS):  # until every buffer on the way is full, or 30 s
            sent = 0
            for end in writers:
                try:
                    sent += end.send(b"x" * CHUNK)
                except BlockingIOError:
                    pass
            poured += sent
            if not sent or time.monotonic() > deadline:
                break
        full = rss(server.pid)
        return {
            "circuits": circuits,
            "bound_per_circuit": (bound - before) / circuits,
            "full_per_circuit": (full - before) / circuits,
            "poured_per_circuit": poured / circuits,
            "target_per_circuit": RELAY_MEMORY_TARGET,
        }
    finally:
        for sock in socks:
            sock.close()
        stop(server)
