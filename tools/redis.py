"""A throwaway ``redis-server`` for the tests, the benchmarks and ``make redis``.

Debian's ``redis-server`` (``make netns-deps`` installs it), run on a Unix
socket in a fresh directory (no TCP port: nothing outside this machine's
processes can reach it), without persistence. ``python -m tools.redis``
runs one in the foreground on ``127.0.0.1:6379`` for trying
``punch-rendezvous --redis`` by hand, until Ctrl-C.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

READY = "ready to accept connections"
"""The line redis-server logs once it serves (redis 7)."""
START_TIMEOUT = 10.0
"""Seconds a redis-server may take to say it is ready."""


class RedisServer:
    """A redis-server on a Unix socket; a context manager that stops it and deletes its files.

    Attributes:
        url: ``unix:///…/redis.sock``, for ``punch-rendezvous --redis``.

    Raises (on start):
        FileNotFoundError: no ``redis-server`` on PATH.
        RuntimeError: it exited or did not say it is ready within :data:`START_TIMEOUT` s.
    """

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed (make netns-deps installs it)")
        self.directory = Path(tempfile.mkdtemp(prefix="punch-redis-"))
        self.socket = self.directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start it (again, after :meth:`kill`, on the same socket: a Redis restart)."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        output = ""
        while (left := deadline - time.monotonic()) > 0 and READY not in output.lower():
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            chunk = os.read(self.process.stdout.fileno(), 65536).decode() if ready else ""
            if ready and not chunk:
                break  # it exited
            output += chunk
        if READY not in output.lower():
            self.kill()
            raise RuntimeError(f"redis-server did not start: {output[-500:]!r}")
        # the rest of its log stays unread: a few lines (redis logs no client at "notice")

    def kill(self) -> None:
        """SIGKILL it and wait: every connection to it is lost, every key with it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP it: connections stay open and nothing is answered (a partition)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT it after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None:
            self.resume()
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main() -> int:
    """``make redis``: redis-server on 127.0.0.1:6379, no persistence, in the foreground."""
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: make netns-deps installs it", file=sys.stderr)
        return 1
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", ""]
    os.execvp(argv[0], [*argv, "--appendonly", "no"])


if __name__ == "__main__":
    sys.exit(main())
