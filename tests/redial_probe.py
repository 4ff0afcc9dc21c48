"""Run inside a namespace whose loopback answers SYNs to PORT_B with ICMP port
unreachable (see test_redial.py).

Usage: ``python -m tests.redial_probe PORT_A PORT_B``. Dials 127.0.0.1:PORT_B
from PORT_A twice with one :class:`punch.reuse.Redial`, lets a socket on
PORT_B open simultaneously toward PORT_A, dials once more, and prints one JSON
line: whether each refused socket was kept and its TCP state, whether the last
dial connected, and the sequence numbers of every SYN that left PORT_A (read
off lo with ``AF_PACKET``).
"""

from __future__ import annotations

import json
import socket
import struct
import sys

import trio

from punch._endpoint import Endpoint
from punch.reuse import Redial, dial


def segments(
    capture: socket.socket, source: int, target: int, flags: int = 0x02
) -> list[tuple[int, int]]:
    """(sequence number, IP TTL) of each TCP segment from ``source`` to ``target`` whose
    SYN and ACK flags are ``flags`` (default: a SYN without ACK), each once (lo shows
    a segment leaving and arriving)."""
    seen: list[tuple[int, int]] = []
    while True:
        try:
            frame = capture.recv(65535)
        except BlockingIOError:
            return sorted(set(seen))
        ip = frame[14:]
        if ip[9] != socket.IPPROTO_TCP:
            continue
        tcp = ip[(ip[0] & 15) * 4 :]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        if (sport, dport) == (source, target) and tcp[13] & 0x12 == flags:
            seen.append((seq, ip[8]))


def lo_capture() -> socket.socket:
    """A non-blocking ``AF_PACKET`` socket that sees every frame on ``lo``."""
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    capture.bind(("lo", 0))
    capture.setblocking(False)
    return capture


def syn_sequence_numbers(capture: socket.socket, source: int, target: int) -> list[int]:
    """SYNs (no ACK) from ``source`` to ``target``: their sequence numbers."""
    return [seq for seq, _ in segments(capture, source, target)]


async def main(port_a: int, port_b: int) -> None:
    a, b = Endpoint("127.0.0.1", port_a), Endpoint("127.0.0.1", port_b)
    capture = lo_capture()
    redial = Redial()
    report: dict[str, object] = {"kept": [], "states": []}
    for _ in range(2):
        try:
            await dial(a, b, redial=redial)
        except ConnectionRefusedError:
            report["kept"].append(redial.kept)  # type: ignore[attr-defined]
            sock = redial._sock
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] if sock else None
            report["states"].append(state)  # type: ignore[attr-defined]
        await trio.sleep(0.05)  # the race's pacing after a refusal (MIN_PACING)
    # the peer's SYN, from PORT_B: it meets the kept socket (a simultaneous open)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    peer.bind(b.sockaddr())
    peer.setblocking(False)
    peer.connect_ex(a.sockaddr())
    with trio.move_on_after(5):
        stream = await dial(a, b, redial=redial)
        report["connected"] = stream.socket.getpeername()[1] == port_b
        report["syns"] = syn_sequence_numbers(capture, port_a, port_b)
        await stream.aclose()
    peer.close()
    capture.close()
    print(json.dumps(report))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
