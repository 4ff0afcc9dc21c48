"""Run inside a namespace whose loopback drops SYNs to PORT_B with a TTL below 3, as
the next router does with a priming SYN (see test_redial.py).

Usage: ``python -m tests.prime_probe PORT_A PORT_B``. Primes 127.0.0.1:PORT_B
from PORT_A (:func:`punch.reuse.prime`), lets a socket on PORT_B open toward
PORT_A, dials PORT_B with the same :class:`punch.reuse.Redial`, and prints one
JSON line: the primed socket's TTL and its TCP state after the peer's SYN, the
sequence number and TTL of every SYN and SYN-ACK that left PORT_A (read off lo
with ``AF_PACKET``), and whether the dial connected.
"""

from __future__ import annotations

import json
import socket
import sys

import trio

from punch._endpoint import Endpoint
from punch.reuse import Redial, dial, prime
from tests.helpers import tcp_state
from tests.redial_probe import lo_capture, segments


async def main(port_a: int, port_b: int) -> None:
    a, b = Endpoint("127.0.0.1", port_a), Endpoint("127.0.0.1", port_b)
    capture = lo_capture()
    redial = Redial()
    report: dict[str, object] = {}
    prime(a, b, redial)
    report["kept"] = redial.kept
    primed = redial._sock
    assert primed is not None
    report["ttl_after"] = primed.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    # the peer's SYN, from PORT_B (delivered within connect_ex on loopback)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    peer.bind(b.sockaddr())
    peer.setblocking(False)
    peer.connect_ex(a.sockaddr())
    report["state_after_peer_syn"] = tcp_state(primed)  # type: ignore[arg-type]
    with trio.move_on_after(5):
        stream = await dial(a, b, redial=redial)
        report["connected"] = stream.socket.getpeername()[1] == port_b
        await stream.aclose()
    report["syns"] = segments(capture, port_a, port_b)
    report["syn_acks"] = segments(capture, port_a, port_b, flags=0x12)
    peer.close()
    capture.close()
    print(json.dumps(report))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
