"""Run inside a namespace whose loopback drops SYN-ACKs and RSTs (see test_linger.py).

Usage: ``python -m tests.linger_probe PORT_A PORT_B``. Brings a ``punch`` dial
from 127.0.0.1:PORT_A into SYN_RECV by a simultaneous open from PORT_B,
cancels the dial there, and prints one JSON line: the kernel's TCP state for
the dial's 4-tuple after the cancel (``None`` when the socket is gone) and the
errno of a fresh connect on that same 4-tuple (``115`` EINPROGRESS: free;
``99`` EADDRNOTAVAIL: still held).
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys

import trio

from punch._endpoint import Endpoint
from punch.reuse import _set_reuse, dial

# /proc/net/tcp "st" column (include/net/tcp_states.h)
SYN_SENT, SYN_RECV = "02", "03"
POLL_S, POLL_LIMIT = 0.01, 300  # at most 3 s per wait


def tcp_state(local_port: int, remote_port: int) -> str | None:
    """The state of the 127.0.0.1:local_port -> 127.0.0.1:remote_port socket, or None."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                return str(fields[3])
    return None


async def wait_state(local_port: int, remote_port: int, state: str) -> None:
    for _ in range(POLL_LIMIT):
        if tcp_state(local_port, remote_port) == state:
            return
        await trio.sleep(POLL_S)
    raise SystemExit(f"{local_port}->{remote_port} never reached state {state}")


async def main(port_a: int, port_b: int) -> None:
    a, b = Endpoint.parse(f"127.0.0.1:{port_a}"), Endpoint.parse(f"127.0.0.1:{port_b}")
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    other.bind(("127.0.0.1", port_b))
    other.setblocking(False)
    async with trio.open_nursery() as nursery:
        cancel = trio.CancelScope()

        async def dialer() -> None:
            with cancel:
                await dial(a, b)

        nursery.start_soon(dialer)
        # A's SYN finds no listener; the RST that would refuse it is dropped.
        await wait_state(port_a, port_b, SYN_SENT)
        # B's SYN meets A in SYN_SENT: simultaneous open (RFC 9293 §3.5, figure 8)
        assert other.connect_ex(("127.0.0.1", port_a)) == errno.EINPROGRESS
        await wait_state(port_a, port_b, SYN_RECV)
        cancel.cancel()
    after = tcp_state(port_a, port_b)
    with socket.socket() as again:
        _set_reuse(again)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        again.bind(("127.0.0.1", port_a))
        again.setblocking(False)
        code = again.connect_ex(("127.0.0.1", port_b))  # non-blocking: no wait
    other.close()
    print(json.dumps({"state_after_cancel": after, "redial_errno": code}))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
