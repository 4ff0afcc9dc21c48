"""Send a file over a punched connection, with its SHA-256 checked on arrival.

The wire: one JSON line ``{"name", "size", "sha256"}``, then ``size`` bytes;
the receiver answers ``ok`` or ``bad`` on a line of its own.

Run it all in one process (a 4 MiB random file, loopback rendezvous)::

    python examples/file_transfer.py

or across machines, against a running ``punch-rendezvous``::

    python examples/file_transfer.py --rendezvous 203.0.113.10:7000 --receive DIR   # on one
    python examples/file_transfer.py --rendezvous 203.0.113.10:7000 --send FILE     # on the other
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import trio

import punch

CHUNK = 65536


async def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    async with await trio.open_file(path, "rb") as file:
        while chunk := await file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def send_file(stream: punch.PeerStream, path: Path) -> None:
    """Send ``path``; raise ``ValueError`` if the receiver reports a bad checksum."""
    size = (await trio.Path(path).stat()).st_size
    header = {"name": path.name, "size": size, "sha256": await _sha256(path)}
    await stream.send_all(json.dumps(header).encode() + b"\n")
    async with await trio.open_file(path, "rb") as file:
        while chunk := await file.read(CHUNK):
            await stream.send_all(chunk)
    await stream.send_eof()
    answer = await stream.receive_some()
    if answer != b"ok\n":
        raise ValueError(f"receiver answered {answer!r}")


async def receive_file(stream: punch.PeerStream, directory: Path) -> Path:
    """Receive one file into ``directory``; it must not exist yet. Returns its path."""
    buffer = b""
    while b"\n" not in buffer:
        data = await stream.receive_some()
        if not data:
            raise ValueError("sender closed before the header")
        buffer += data
    line, body = buffer.split(b"\n", 1)
    header = json.loads(line)
    target = directory / Path(header["name"]).name  # never outside `directory`
    digest, received = hashlib.sha256(), 0
    async with await trio.open_file(target, "xb") as file:
        while True:
            await file.write(body)
            digest.update(body)
            received += len(body)
            if not (body := await stream.receive_some(CHUNK)):
                break
    good = received == header["size"] and digest.hexdigest() == header["sha256"]
    await stream.send_all(b"ok\n" if good else b"bad\n")
    if not good:
        await trio.Path(target).unlink()
        raise ValueError(f"{header['name']}: size or SHA-256 does not match")
    return target


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
