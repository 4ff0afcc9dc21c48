"""A delay line for the lab's WAN router: every packet it forwards waits a fixed time.

``python -m netns.delay DEVICE SECONDS`` (inside the WAN namespace, as root)

This kernel has no ``netem`` or ``fq`` qdisc, so the lab delays in user space:
the WAN router's policy routing sends every forwarded packet into the TUN
device ``DEVICE`` (tuntap(4)), and this process writes each one back ``SECONDS``
later, from where the router forwards it on by its main table. One-way delay
between two sites is then ``SECONDS`` plus the forwarding time.

Why the lab needs it: against a NAT that answers unsolicited SYNs with an RST
(``cone-rst``), a simultaneous open succeeds only when the two SYNs cross
within about one round trip between the NATs. With zero delay that window is
tens of microseconds and the outcome is luck; on the internet it is
milliseconds.

It forwards only what arrives, holds at most :data:`MAX_HELD` packets (more
are dropped, as a full router queue drops), and exits when its device goes
away (the lab deletes the namespace) or on SIGTERM.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_HELD = 10_000
"""Packets held at once; beyond that, new packets are dropped."""
MAX_DELAY = 5.0
"""Seconds a packet may be held: a WAN delay, or one peer's introduction held back."""


def open_tun(name: str) -> int:
    """Attach to the existing TUN device ``name`` (``ip tuntap add``); return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def run(fd: int, delay: float) -> None:
    """Forward every packet read from ``fd`` back into it ``delay`` seconds later."""
    held: deque[tuple[float, bytes]] = deque()
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([fd], [], [], timeout)
        if readable:
            packet = os.read(fd, 65536)
            if len(held) < MAX_HELD:
                held.append((time.monotonic() + delay, packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            os.write(fd, held.popleft()[1])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, delay = argv[0], float(argv[1])
    if not 0 <= delay <= MAX_DELAY:
        print(f"delay must be 0-{MAX_DELAY:g} seconds", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = open_tun(name)
    print("ready", flush=True)
    try:
        run(fd, delay)  # returns only by raising
    except OSError:  # the device went away with its namespace
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
