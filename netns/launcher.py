"""Start ``punch`` commands in the lab without paying Python's start-up each time.

A ``punch`` process spends about 0.3 s starting Python and importing trio,
cryptography and punch before its ``main`` runs; the timing sweep starts two
per trial, 1,800 in all, which was a third of its time (issue 12: ``make
sweep`` under 30 minutes). :class:`Launcher` runs one Python process,
``python -m netns.launcher``, that imports ``punch._cli`` once and forks a
child per command. The child:

- joins the command's network namespace with setns(2), as ``ip netns exec``
  does (setns(2), ip-netns(8); the mount namespace and ``/sys`` remount that
  ``ip netns exec`` adds are not needed: punch reads ``/proc/sys/net`` and
  the interface list, which follow the caller's network namespace);
- starts a session of its own (setsid(2)), so it can be killed as a group;
- takes a pipe holding its stdin bytes, and files for stdout and stderr;
- runs ``punch._cli.main(argv)``, the code a ``punch`` process runs once its
  imports are done, and exits with its return code.

Times that punch reports are unchanged: each counts from inside ``main``
(the JSON events' ``elapsed``) or from the introduction.

The harness talks to the launcher with JSON lines: it sends ``{"netns",
"argv", "stdin", "stdout", "stderr"}`` and reads ``{"started": pid}``; when a
child exits, the launcher reaps it and sends ``{"exited": pid,
"returncode": rc}``. :class:`Forked` is the harness's handle on a child,
with the part of :class:`subprocess.Popen` that :class:`netns.scenario.PairRun`
uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

CLONE_NEWNET = 0x40000000
"""setns(2)'s ``nstype`` for a network namespace (linux/sched.h)."""
NETNS_DIR = "/run/netns"
"""Where ``ip netns add`` keeps a handle on each named namespace (ip-netns(8))."""
REPLY_TIMEOUT = 10.0
"""Seconds the harness waits for the launcher to say it started a child."""


def namespace_of(prefix: list[str]) -> str | None:
    """The network namespace that an argv prefix from :meth:`netns.lab.Lab.exec_prefix`
    runs in: None for no prefix (this namespace).

    Raises:
        ValueError: the prefix is anything else (the launcher runs only ``punch``).
    """
    if not prefix:
        return None
    if len(prefix) == 4 and prefix[:3] == ["ip", "netns", "exec"]:
        return prefix[3]
    raise ValueError(f"not a network namespace prefix: {prefix!r}")


class Forked:
    """One child of the launcher, as :class:`subprocess.Popen` would show it
    (``pid``, ``returncode``, ``poll``, ``wait``, ``kill``; no pipes)."""

    stdin = None

    def __init__(self, launcher: Launcher, pid: int) -> None:
        self.launcher = launcher
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self.launcher.exited.get(self.pid)

    def poll(self) -> int | None:
        self.launcher.read_replies(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The return code, once the child has exited.

        Raises:
            subprocess.TimeoutExpired: it is still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"punch (pid {self.pid})", timeout or 0.0)
            self.launcher.read_replies(left)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Launcher:
    """The harness's side: starts ``python -m netns.launcher`` and forks ``punch``
    commands through it. Use as a context manager; closing it ends the launcher,
    which kills the children still running."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netns.launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.exited: dict[int, int] = {}
        self._started: list[int] = []
        self._pending = b""

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def start(
        self, netns: str | None, argv: list[str], stdin: bytes, stdout: str, stderr: str
    ) -> Forked:
        """Fork ``punch ARGV`` in ``netns`` (None: the launcher's own).

        Raises:
            RuntimeError: the launcher did not start it within :data:`REPLY_TIMEOUT`.
        """
        assert self.process.stdin is not None
        for path in (stdout, stderr):  # there already when this returns, as with Popen
            open(path, "wb").close()
        request = {
            "netns": netns,
            "argv": argv,
            "stdin": stdin.decode("latin-1"),
            "stdout": stdout,
            "stderr": stderr,
        }
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not self._started:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise RuntimeError(f"the launcher did not start punch {argv!r}")
            self.read_replies(left)
        return Forked(self, self._started.pop(0))

    def read_replies(self, timeout: float | None) -> None:
        """Take in the launcher's replies: wait up to ``timeout`` seconds for the
        first (None: without end), then read what is there without waiting."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError("the launcher exited")
            self._pending += data
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                reply = json.loads(line)
                if "started" in reply:
                    self._started.append(reply["started"])
                else:
                    self.exited[reply["exited"]] = reply["returncode"]
            ready, _, _ = select.select([fd], [], [], 0)


# The launcher's side: ``python -m netns.launcher``.


def _child(request: dict[str, Any], stdin_fd: int, main: Any) -> None:
    """In the forked child: join the namespace, take the files, run punch. Never returns."""
    code = 1
    try:
        os.setsid()
        if request["netns"] is not None:
            ns = os.open(os.path.join(NETNS_DIR, request["netns"]), os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(ns, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {request['netns']}")
            os.close(ns)
        os.dup2(stdin_fd, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            opened = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(opened, fd)
            os.close(opened)
        os.closerange(3, 1024)  # the launcher's pipes and pidfds; punch has opened nothing
        sys.argv = ["punch", *request["argv"]]
        code = main(request["argv"])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork(request: dict[str, Any], main: Any) -> int:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        _child(request, read_end, main)
    os.close(read_end)
    os.write(write_end, request["stdin"].encode("latin-1"))  # a line: within a pipe's buffer
    os.close(write_end)
    return pid


def serve() -> None:
    """Read requests on stdin, fork one child each, tell when each exits; at the end
    of stdin, kill the children still running and exit."""
    from punch._cli import main  # the import every child would otherwise pay for

    gc.freeze()  # a child's collections leave the imported objects' pages shared

    children: dict[int, int] = {}  # pidfd -> pid
    pending = b""

    def reply(message: dict[str, Any]) -> None:
        os.write(1, json.dumps(message).encode() + b"\n")

    while True:
        ready, _, _ = select.select([0, *children], [], [])
        for fd in ready:
            if fd != 0:
                pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                reply({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
                continue
            data = os.read(0, 65536)
            if not data:
                for pid in children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                pid = _fork(json.loads(line), main)
                children[os.pidfd_open(pid)] = pid
                reply({"started": pid})


if __name__ == "__main__":
    serve()
