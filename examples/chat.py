"""Two peers exchange lines of text over a punched connection.

Run it all in one process, with its own rendezvous on loopback::

    python examples/chat.py

or type to each other across machines, against a running ``punch-rendezvous``::

    python examples/chat.py --rendezvous 203.0.113.10:7000 --as bob     # on one
    python examples/chat.py --rendezvous 203.0.113.10:7000 --as alice   # on the other
"""

from __future__ import annotations

import argparse
import os
import sys

import trio
import trio.testing

import punch


async def chat(stream: punch.PeerStream, lines: trio.abc.ReceiveStream) -> None:
    """Send what ``lines`` yields and print what the peer sends, until both ends are done."""

    async def send() -> None:
        while data := await lines.receive_some():
            await stream.send_all(data)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        buffer = b""
        while data := await stream.receive_some():
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                print(f"{stream.peer_name}: {line.decode(errors='replace')}", flush=True)


async def scripted(rendezvous: punch.Endpoint) -> None:
    """Both sides in this process: each says two lines."""
    async with punch.open_host("bob", rendezvous=rendezvous) as bob_host, trio.open_nursery() as n:
        accepted: list[punch.PeerStream] = []

        async def accept() -> None:
            accepted.append(await bob_host.accept())

        n.start_soon(accept)
        alice = await punch.connect("bob", rendezvous=rendezvous, name="alice")
    bob = accepted[0]
    async with alice, bob, trio.open_nursery() as nursery:
        send_a, receive_a = trio.testing.memory_stream_one_way_pair()
        send_b, receive_b = trio.testing.memory_stream_one_way_pair()
        nursery.start_soon(chat, alice, receive_a)
        nursery.start_soon(chat, bob, receive_b)
        await send_a.send_all(b"hi bob\nhow is the weather behind your NAT?\n")
        await send_b.send_all(b"hi alice\nsunny, and the port is preserved\n")
        await send_a.aclose()
        await send_b.aclose()


async def main(args: argparse.Namespace) -> None:
    if args.rendezvous is None:
        async with trio.open_nursery() as nursery:
            rendezvous = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
            await scripted(rendezvous)
            nursery.cancel_scope.cancel()
        return
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with punch.open_host(args.role, rendezvous=args.rendezvous) as host:
        other = "bob" if args.role == "alice" else "alice"
        stream = await (host.connect(other) if args.role == "alice" else host.accept())
    async with stream, stdin:
        await chat(stream, stdin)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendezvous", metavar="IP:PORT")
    parser.add_argument("--as", dest="role", choices=["alice", "bob"], default="alice")
    trio.run(main, parser.parse_args())
