"""One Host, one port, several punched connections at once.

A hub punches to three peers concurrently; every stream shares the hub's one
local port (TCP tells them apart by the remote end of the 4-tuple)::

    python examples/many_peers.py
"""

from __future__ import annotations

import trio

import punch

PEERS = ["bob", "carol", "dave"]


async def echo_peer(
    name: str,
    rendezvous: punch.Endpoint,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with punch.open_host(name, rendezvous=rendezvous) as host:
        task_status.started()
        async with await host.accept() as stream:
            await stream.send_all(f"{name} here: ".encode() + await stream.receive_some())


async def main() -> None:
    async with trio.open_nursery() as nursery:
        rendezvous = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
        for name in PEERS:
            await nursery.start(echo_peer, name, rendezvous)
        async with punch.open_host("hub", rendezvous=rendezvous) as hub:
            streams: dict[str, punch.PeerStream] = {}

            async def dial(name: str) -> None:
                streams[name] = await hub.connect(name)

            async with trio.open_nursery() as dials:
                for name in PEERS:
                    dials.start_soon(dial, name)
            for name in PEERS:
                async with streams[name] as stream:
                    await stream.send_all(b"ping")
                    reply = (await stream.receive_some()).decode()
                    print(f"hub {stream.local} <-> {name} {stream.remote}: {reply}")
            assert len({s.local.port for s in streams.values()}) == 1  # one port for all
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
