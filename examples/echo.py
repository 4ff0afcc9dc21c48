"""The smallest complete punch program: bob echoes, alice checks.

Run it all in one process, with its own rendezvous on loopback::

    python examples/echo.py

or across machines, against a running ``punch-rendezvous``::

    python examples/echo.py --rendezvous 203.0.113.10:7000 --as bob     # on one
    python examples/echo.py --rendezvous 203.0.113.10:7000 --as alice   # on the other
"""

from __future__ import annotations

import argparse

import trio

import punch


async def bob(
    rendezvous: punch.Endpoint | str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with punch.open_host("bob", rendezvous=rendezvous) as host:
        task_status.started()
        async with await host.accept() as stream:
            while data := await stream.receive_some():
                await stream.send_all(data)


async def alice(rendezvous: punch.Endpoint | str) -> None:
    async with await punch.connect("bob", rendezvous=rendezvous, name="alice") as stream:
        await stream.send_all(b"ping")
        await stream.send_eof()
        reply = await stream.receive_some()
        print(f"alice: {stream.local} -> {stream.remote}: sent b'ping', got {reply!r}")
        assert reply == b"ping"


async def main(args: argparse.Namespace) -> None:
    if args.rendezvous is None:  # everything in this process, on loopback
        async with trio.open_nursery() as nursery:
            rendezvous = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
            await nursery.start(bob, rendezvous)
            await alice(rendezvous)
            nursery.cancel_scope.cancel()
    elif args.role == "bob":
        await bob(args.rendezvous)
    else:
        await alice(args.rendezvous)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendezvous", metavar="IP:PORT")
    parser.add_argument("--as", dest="role", choices=["alice", "bob"], default="alice")
    trio.run(main, parser.parse_args())
