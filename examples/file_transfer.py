"""Send a file over a punched connection, with its SHA-256 checked on arrival.

These are the library calls behind ``punch send`` / ``punch receive``:
:func:`punch.transfer.send_file` announces name, size and SHA-256, waits for
the receiver's go-ahead, sends the bytes and waits for its verdict;
:func:`punch.transfer.receive_file` saves the file under its name only once
size and digest match.

Run it all in one process (a 4 MiB random file, loopback rendezvous)::

    python examples/file_transfer.py

or across machines, against a running ``punch-rendezvous``::

    python examples/file_transfer.py --rendezvous 203.0.113.10:7000 --receive DIR   # on one
    python examples/file_transfer.py --rendezvous 203.0.113.10:7000 --send FILE     # on the other
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

import punch
from punch.transfer import receive_file, send_file


async def demo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "random.bin"
        source.write_bytes(os.urandom(4 * 1024 * 1024))
        inbox = Path(tmp) / "inbox"
        inbox.mkdir()
        async with trio.open_nursery() as nursery:
            rendezvous = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
            async with punch.open_host("receiver", rendezvous=rendezvous) as receiver:
                received: list[Path] = []

                async def receive() -> None:
                    async with await receiver.accept() as stream:
                        received.append(await receive_file(stream, inbox))

                nursery.start_soon(receive)
                start = time.perf_counter()
                async with await punch.connect(
                    "receiver", rendezvous=rendezvous, name="sender"
                ) as s:
                    await send_file(s, source)
                seconds = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        assert received[0].read_bytes() == source.read_bytes()
        size = source.stat().st_size
        print(f"sent {size} bytes, SHA-256 verified, {size / seconds / 1e6:.0f} MB/s")


async def main(args: argparse.Namespace) -> None:
    if args.rendezvous is None:
        await demo()
    elif args.send:
        async with await punch.connect("receiver", rendezvous=args.rendezvous, name="sender") as s:
            await send_file(s, Path(args.send))
    else:
        async with punch.open_host("receiver", rendezvous=args.rendezvous) as host:
            async with await host.accept() as stream:
                print(await receive_file(stream, Path(args.receive)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendezvous", metavar="IP:PORT")
    parser.add_argument("--send", metavar="FILE")
    parser.add_argument("--receive", metavar="DIR", default=".")
    trio.run(main, parser.parse_args())
