"""One benchmark peer, run inside a lab namespace: ``python -m benchmarks.peer alice|bob``.

``bob`` serves until killed: punched streams (as registered peer ``bob``, TLS;
and ``bob-plain``, without), a port-forwarded direct listener that runs the
same handshake and TLS (the baseline), a raw TCP listener and a raw TCP
listener under ``trio.SSLStream`` with the same TLS settings (the throughput
baselines). Both sides derive the baselines' keys from the shared secret.
``alice`` drives the phases one after another (the throughput flows take
turns, round by round) and prints one JSON document of figures on stdout.

Per stream, alice's first byte says what she wants: ``?`` (bob answers one
JSON line about his side of the connection, then the stream closes) or ``T``
(throughput rounds: ``bytes`` each way per round, each acknowledged by one
byte, timed by the sender).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import ssl
import time
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import punch
from punch import Candidate, CandidateType, Endpoint, Role
from punch._outcome import max_attempts_per_second
from punch._protocol import Introduction
from punch._race import InboundRouter, PunchOptions, Race
from punch._secure import encrypt, race_context

CHUNK = 1 << 18
"""Bytes per send/receive call in the throughput rounds (256 KiB)."""
LONG = 600.0
"""Seconds: a deadline no benchmark phase comes near; everything is bounded by it."""
LONG_PUNCH = PunchOptions(timeout=LONG)


@functools.cache
def identity(secret: bytes, role: Role) -> punch.Identity:
    """The baselines' key of ``role``: both sides derive both from the shared secret.
    One per process, its TLS contexts built at once, as a host builds its own."""
    seed = hashlib.sha256(secret + role.value.encode()).digest()
    ours = punch.Identity(Ed25519PrivateKey.from_private_bytes(seed))
    ours.prepare_tls()
    return ours


def direct_introduction(secret: bytes, trial: int, role: Role, to: Endpoint | None) -> Introduction:
    """What the rendezvous would have sent for direct trial ``trial`` (both sides derive it)."""
    attempt_id = hashlib.sha256(secret + trial.to_bytes(4, "big")).digest()[:16]
    candidates = (Candidate(CandidateType.HOST, to),) if to is not None else ()
    peer = "bob" if role is Role.INITIATOR else "alice"
    request_id = 1 if role is Role.INITIATOR else None
    certificate = identity(secret, role.other).certificate
    return Introduction(peer, role, attempt_id, secret, candidates, certificate, request_id)


def tls_context(secret: bytes, role: Role) -> ssl.SSLContext:
    """The TLS settings of a punched stream, for the ``trio.SSLStream`` baseline."""
    ours, theirs = identity(secret, role), identity(secret, role.other)
    return ours.tls_context(theirs.certificate, server_side=role is Role.RESPONDER)


async def direct_stream(
    secret: bytes, trial: int, role: Role, to: Endpoint | None, local: Endpoint, inbound: Any
) -> punch.PeerStream:
    """One direct baseline: the same race handshake, then the same TLS, as a punch
    (TLS's first flights in the handshake's, from a context made beforehand, as a
    host makes it as it opens)."""
    intro = direct_introduction(secret, trial, role, to)
    ours = identity(secret, role)
    tls = race_context(ours, intro, encrypt=True)
    stream = await Race(intro, local, inbound, options=LONG_PUNCH, tls=tls).run()
    await encrypt(stream, ours, intro, None, LONG)
    return stream


def about(stream: punch.PeerStream) -> dict[str, Any]:
    return {
        "connect_time": stream.connect_time,
        "tls_time": stream.tls_time,
        "won_by": stream.won_by.value,
        "attempts_per_s": max_attempts_per_second(stream.attempts),
    }


async def send_bytes(stream: trio.abc.Stream, count: int) -> None:
    block = memoryview(bytes(CHUNK))
    sent = 0
    while sent < count:
        size = min(CHUNK, count - sent)
        await stream.send_all(block[:size])
        sent += size


async def receive_exactly(stream: trio.abc.Stream, count: int) -> bytes:
    """Exactly ``count`` bytes, never one more: the bulk data follows at once."""
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise EOFError(f"stream ended after {len(data)} of {count} bytes")
        data += chunk
    return data


async def receive_bytes(stream: trio.abc.Stream, count: int) -> None:
    got = 0
    while got < count:
        data = await stream.receive_some(min(CHUNK, count - got))
        if not data:
            raise EOFError(f"stream ended after {got} of {count} bytes")
        got += len(data)


async def timed_send(stream: trio.abc.Stream, count: int) -> float:
    """Seconds from the first byte sent to the receiver's acknowledgement of the last."""
    started = time.perf_counter()
    await send_bytes(stream, count)
    if await stream.receive_some(1) != b"!":
        raise EOFError("no acknowledgement")
    return time.perf_counter() - started


async def serve_stream(stream: trio.abc.Stream, about: dict[str, Any]) -> None:
    """Bob's side of one stream (see the module docstring)."""
    async with stream:
        what = await stream.receive_some(1)
        if what == b"?":
            await stream.send_all(json.dumps(about).encode() + b"\n")
            await stream.receive_some(1)  # alice closes first
        elif what == b"T":
            rounds, count = json.loads(await receive_exactly(stream, 64))
            for _ in range(rounds):
                await receive_bytes(stream, count)
                await stream.send_all(b"!")
                await timed_send(stream, count)


async def bob(args: argparse.Namespace) -> None:
    secret = bytes.fromhex(args.secret)
    async with (
        punch.open_host("bob", rendezvous=args.rendezvous, timeout=LONG) as host,
        punch.open_host("bob-plain", rendezvous=args.rendezvous, encrypt=False) as plain,
        trio.open_nursery() as nursery,
    ):

        async def punched(host: punch.Host) -> None:
            while True:
                try:
                    stream = await host.accept()
                except punch.PunchFailed:
                    continue  # alice records it
                nursery.start_soon(serve_stream, stream, about(stream))

        async def direct(router: InboundRouter, trial: int) -> None:
            intro = direct_introduction(secret, trial, Role.RESPONDER, None)
            local = Endpoint("0.0.0.0", args.direct_port)
            try:
                inbound = router.open_route(intro.attempt_id)
                stream = await direct_stream(secret, trial, Role.RESPONDER, None, local, inbound)
            finally:
                router.close_route(intro.attempt_id)
            await serve_stream(stream, about(stream))

        async def raw(stream: trio.SocketStream) -> None:
            await serve_stream(stream, {})

        async def raw_tls(stream: trio.SocketStream) -> None:
            context = tls_context(secret, Role.RESPONDER)
            await serve_stream(trio.SSLStream(stream, context, server_side=True), {})

        router = InboundRouter(Endpoint("0.0.0.0", args.direct_port))
        await nursery.start(router.serve)
        for trial in range(args.trials):
            nursery.start_soon(direct, router, trial)
        nursery.start_soon(punched, host)
        nursery.start_soon(punched, plain)
        nursery.start_soon(trio.serve_tcp, raw, args.raw_port)
        nursery.start_soon(trio.serve_tcp, raw_tls, args.tls_port)
        print("ready", flush=True)


async def ask(stream: trio.abc.Stream) -> dict[str, Any]:
    """Alice's ``?``: bob's JSON line about the same connection."""
    await stream.send_all(b"?")
    line = b""
    while not line.endswith(b"\n"):
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError("bob closed without answering")
        line += data
    result: dict[str, Any] = json.loads(line)
    return result


FLOWS = {
    "punched": ("bob", True, "never"),
    "plain": ("bob-plain", False, "never"),
    "relayed": ("bob", True, "only"),  # the rendezvous's relay (issue 17)
    "relayed-plain": ("bob-plain", False, "only"),
}
"""The punched throughput flows: flow -> (bob's name, encrypted, ``connect``'s relay)."""
BASELINES = ("raw", "sslstream")
"""The throughput baselines: raw TCP, and raw TCP under ``trio.SSLStream``."""


async def open_flow(
    stack: contextlib.AsyncExitStack, flow: str, args: argparse.Namespace
) -> trio.abc.Stream:
    """Alice's stream of ``flow`` (:data:`FLOWS` or :data:`BASELINES`), closed with ``stack``."""
    if flow in FLOWS:
        peer, encrypted, relay = FLOWS[flow]
        host = await stack.enter_async_context(
            punch.open_host(f"alice-{flow}", rendezvous=args.rendezvous, encrypt=encrypted)
        )
        stream: trio.abc.Stream = await host.connect(peer, relay=relay)
        assert stream.path.value == ("relayed" if relay == "only" else "direct")
    else:
        to = Endpoint.parse(args.raw if flow == "raw" else args.tls)
        stream = await trio.open_tcp_stream(to.ip, to.port)
        if flow == "sslstream":
            context = tls_context(bytes.fromhex(args.secret), Role.INITIATOR)
            stream = trio.SSLStream(stream, context)
    return await stack.enter_async_context(stream)


async def throughput(args: argparse.Namespace, flows: list[str]) -> dict[str, Any]:
    """``args.rounds`` of ``args.bytes`` each way on every flow; seconds per round,
    per direction, and flow by flow.

    The flows take turns, round by round (round 1 of each flow, then round 2 of
    each...), all streams open throughout: a slow spell of the shared machine
    falls on every flow alike, where one flow's rounds after another's put it on
    whichever flow it met (the relayed to punched ratio swung 0.52-1.01 over four
    runs with flows one after another, 2026-12-04).
    """
    report: dict[str, Any] = {"bytes": args.bytes}
    async with contextlib.AsyncExitStack() as stack:
        streams = {flow: await open_flow(stack, flow, args) for flow in flows}
        header = b"T" + json.dumps([args.rounds, args.bytes]).encode().ljust(64)
        for flow, stream in streams.items():
            await stream.send_all(header)
            report[flow] = {"up": [], "down": []}
        for _ in range(args.rounds):
            for flow, stream in streams.items():
                report[flow]["up"].append(await timed_send(stream, args.bytes))
                started = time.perf_counter()
                await receive_bytes(stream, args.bytes)
                report[flow]["down"].append(time.perf_counter() - started)  # bob's send
                await stream.send_all(b"!")
    return report


async def alice(args: argparse.Namespace) -> None:
    secret = bytes.fromhex(args.secret)
    report: dict[str, Any] = {"punch": [], "direct": []}
    # One key for every trial's host, its TLS contexts built before the first, as an
    # application holds its identity (Identity.load_or_create) and as the direct
    # baseline holds its own: a fresh key per trial put a context's build (3-7 ms of
    # CPU, in open_host's worker thread) into each timed punch, and no baseline's.
    ours = punch.Identity.generate()
    ours.prepare_tls()
    for trial in range(args.trials):
        async with punch.open_host(
            f"alice{trial}", rendezvous=args.rendezvous, identity=ours
        ) as host:
            cpu = time.process_time()
            try:
                stream = await host.connect("bob")
            except punch.PunchFailed as exc:
                report["punch"].append({"failed": str(exc)})
                continue
            cpu = time.process_time() - cpu
            async with stream:
                theirs = await ask(stream)
            report["punch"].append({"alice": about(stream), "bob": theirs, "cpu": cpu})
    if args.direct is not None:
        to = Endpoint.parse(args.direct)
        for trial in range(args.trials):
            send, inbound = trio.open_memory_channel[Any](0)
            send.close()  # the baseline dials only
            local = Endpoint("0.0.0.0", 0)
            stream = await direct_stream(secret, trial, Role.INITIATOR, to, local, inbound)
            async with stream:
                theirs = await ask(stream)
            report["direct"].append({"alice": about(stream), "bob": theirs})
    if args.rounds:
        report["throughput"] = await throughput(args, args.flows.split(","))
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer")
    parser.add_argument("role", choices=["alice", "bob"])
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--secret", required=True, help="hex, 32 bytes: the direct baseline's")
    parser.add_argument("--direct-port", type=int, default=7100)
    parser.add_argument("--raw-port", type=int, default=7200)
    parser.add_argument("--tls-port", type=int, default=7300)
    parser.add_argument("--direct", help="alice: bob's forwarded ip:port for the baseline")
    parser.add_argument("--raw", help="alice: bob's forwarded ip:port for raw TCP")
    parser.add_argument("--tls", help="alice: bob's forwarded ip:port for raw TCP + TLS")
    parser.add_argument("--rounds", type=int, default=0, help="alice: throughput rounds")
    parser.add_argument("--bytes", type=int, default=1 << 30, help="per round, each way")
    parser.add_argument(
        "--flows",
        default=",".join([*FLOWS, *BASELINES]),
        help="alice: the throughput flows, comma-separated (default: all)",
    )
    parser.add_argument("--log", action="store_true", help="timestamped DEBUG log on stderr")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(level=logging.DEBUG, format="%(created).6f %(name)s %(message)s")
    trio.run(alice if args.role == "alice" else bob, args)


if __name__ == "__main__":
    main()
