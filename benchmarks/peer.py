"""One benchmark peer, run inside a lab namespace: ``python -m benchmarks.peer alice|bob``.

``bob`` serves until killed: punched streams (as registered peer ``bob``),
a port-forwarded direct listener that runs the same handshake (the baseline),
and a raw TCP listener (the throughput baseline). ``alice`` drives the phases
one after another and prints one JSON document of figures on stdout.

Per stream, alice's first byte says what she wants: ``?`` (bob answers one
JSON line about his side of the connection, then the stream closes) or ``T``
(throughput rounds: ``bytes`` each way per round, each acknowledged by one
byte, timed by the sender).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from typing import Any

import trio

import punch
from punch import Candidate, CandidateType, Endpoint, Role
from punch._outcome import max_attempts_per_second
from punch._protocol import Introduction
from punch._race import InboundRouter, PunchOptions, Race

CHUNK = 1 << 18
"""Bytes per send/receive call in the throughput rounds (256 KiB)."""
LONG = 600.0
"""Seconds: a deadline no benchmark phase comes near; everything is bounded by it."""
LONG_PUNCH = PunchOptions(timeout=LONG)
_CERTIFICATE = punch.Identity.generate().certificate
"""Fills the introductions of the direct trials, whose race runs no TLS."""


def direct_introduction(secret: bytes, trial: int, role: Role, to: Endpoint | None) -> Introduction:
    """What the rendezvous would have sent for direct trial ``trial`` (both sides derive it)."""
    attempt_id = hashlib.sha256(secret + trial.to_bytes(4, "big")).digest()[:16]
    candidates = (Candidate(CandidateType.HOST, to),) if to is not None else ()
    peer = "bob" if role is Role.INITIATOR else "alice"
    request_id = 1 if role is Role.INITIATOR else None
    return Introduction(peer, role, attempt_id, secret, candidates, _CERTIFICATE, request_id)


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
        trio.open_nursery() as nursery,
    ):

        async def punched() -> None:
            while True:
                try:
                    stream = await host.accept()
                except punch.PunchFailed:
                    continue  # alice records it
                about = {
                    "connect_time": stream.connect_time,
                    "won_by": stream.won_by.value,
                    "attempts_per_s": max_attempts_per_second(stream.attempts),
                }
                nursery.start_soon(serve_stream, stream, about)

        async def direct(router: InboundRouter, trial: int) -> None:
            intro = direct_introduction(secret, trial, Role.RESPONDER, None)
            local = Endpoint("0.0.0.0", args.direct_port)
            race = Race(intro, local, router.open_route(intro.attempt_id), options=LONG_PUNCH)
            try:
                stream = await race.run()
            finally:
                router.close_route(intro.attempt_id)
            await serve_stream(stream, {"connect_time": stream.connect_time})

        async def raw(stream: trio.SocketStream) -> None:
            await serve_stream(stream, {})

        router = InboundRouter(Endpoint("0.0.0.0", args.direct_port))
        await nursery.start(router.serve)
        for trial in range(args.trials):
            nursery.start_soon(direct, router, trial)
        nursery.start_soon(punched)
        nursery.start_soon(trio.serve_tcp, raw, args.raw_port)
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


async def throughput(stream: trio.abc.Stream, rounds: int, count: int) -> dict[str, list[float]]:
    """``rounds`` of ``count`` bytes each way; seconds per round, per direction."""
    await stream.send_all(b"T" + json.dumps([rounds, count]).encode().ljust(64))
    up, down = [], []
    for _ in range(rounds):
        up.append(await timed_send(stream, count))
        started = time.perf_counter()
        await receive_bytes(stream, count)
        down.append(time.perf_counter() - started)  # from alice's view: bob's send
        await stream.send_all(b"!")
    return {"up": up, "down": down}


async def alice(args: argparse.Namespace) -> None:
    secret = bytes.fromhex(args.secret)
    report: dict[str, Any] = {"punch": [], "direct": []}
    for trial in range(args.trials):
        async with punch.open_host(f"alice{trial}", rendezvous=args.rendezvous) as host:
            cpu = time.process_time()
            try:
                stream = await host.connect("bob")
            except punch.PunchFailed as exc:
                report["punch"].append({"failed": str(exc)})
                continue
            cpu = time.process_time() - cpu
            async with stream:
                theirs = await ask(stream)
            ours = {
                "connect_time": stream.connect_time,
                "won_by": stream.won_by.value,
                "attempts_per_s": max_attempts_per_second(stream.attempts),
            }
            report["punch"].append({"alice": ours, "bob": theirs, "cpu": cpu})
    if args.direct is not None:
        to = Endpoint.parse(args.direct)
        for trial in range(args.trials):
            intro = direct_introduction(secret, trial, Role.INITIATOR, to)
            send, inbound = trio.open_memory_channel[Any](0)
            send.close()  # the baseline dials only
            stream = await Race(intro, Endpoint("0.0.0.0", 0), inbound, options=LONG_PUNCH).run()
            async with stream:
                theirs = await ask(stream)
            report["direct"].append({"alice": {"connect_time": stream.connect_time}, "bob": theirs})
    if args.rounds:
        async with punch.open_host("alice-t", rendezvous=args.rendezvous) as host:
            async with await host.connect("bob") as stream:
                punched = await throughput(stream, args.rounds, args.bytes)
        to = Endpoint.parse(args.raw)
        async with await trio.open_tcp_stream(to.ip, to.port) as stream:
            raw = await throughput(stream, args.rounds, args.bytes)
        report["throughput"] = {"bytes": args.bytes, "punched": punched, "raw": raw}
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer")
    parser.add_argument("role", choices=["alice", "bob"])
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--secret", required=True, help="hex, 32 bytes: the direct baseline's")
    parser.add_argument("--direct-port", type=int, default=7100)
    parser.add_argument("--raw-port", type=int, default=7200)
    parser.add_argument("--direct", help="alice: bob's forwarded ip:port for the baseline")
    parser.add_argument("--raw", help="alice: bob's forwarded ip:port for raw TCP")
    parser.add_argument("--rounds", type=int, default=0, help="alice: throughput rounds")
    parser.add_argument("--bytes", type=int, default=1 << 30, help="per round, each way")
    parser.add_argument("--log", action="store_true", help="timestamped DEBUG log on stderr")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(level=logging.DEBUG, format="%(created).6f %(name)s %(message)s")
    trio.run(alice if args.role == "alice" else bob, args)


if __name__ == "__main__":
    main()
