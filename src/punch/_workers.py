"""``punch-rendezvous --workers N``: N server processes on one port, and their supervisor.

Each worker is a whole ``punch rendezvous`` process with ``--reuse-port``:
its own listening socket on the same address and port (``SO_REUSEPORT``,
socket(7): the kernel spreads new connections over the workers by a hash
of their addresses), its own peers, and the registry they share in Redis
(``--redis``, :mod:`punch._cluster`), so a peer on one worker can be
introduced to a peer on another.

The supervisor starts them, prints the bound endpoints once every worker
listens, restarts a worker that dies (after :data:`RESTART_DELAY` s: its
peers reconnect, to any worker, and register again once its Redis lease
has run out), and on SIGTERM or SIGINT passes SIGTERM on and waits for all.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import Any

import trio

log = logging.getLogger("punch.server")

RESTART_DELAY = 1.0
"""Seconds between a worker's death and its replacement."""
STOP_TIMEOUT = 10.0
"""Seconds the workers get to stop after SIGTERM before they are killed."""


def worker_argv(argv: list[str]) -> list[str]:
    """A worker's command line: ``python -m punch rendezvous`` with the server's
    arguments (``argv``) less ``--workers``, plus ``--reuse-port``."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            rest.append(arg)
    return [sys.executable, "-m", "punch", "rendezvous", *rest, "--reuse-port"]


async def supervise(argv: list[str], workers: int, lines: int) -> None:
    """Run ``workers`` copies of ``argv``; print the first one's ``lines`` stdout lines
    (its bound endpoints) once each has printed its own; until SIGTERM or SIGINT.

    Raises:
        RuntimeError: a worker exited before it listened.
    """
    stopping = trio.Event()
    processes: dict[int, trio.Process] = {}

    async def run(index: int, task_status: trio.TaskStatus[list[str]]) -> None:
        started = False
        while not stopping.is_set():
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
            processes[index] = process
            try:
                try:
                    bound = await _read_lines(process, lines)
                except RuntimeError:
                    if not started:
                        raise  # the supervisor fails: the flags or Redis are wrong
                    bound = []  # a replacement that died at once: a line below, and again
                else:
                    if not started:
                        task_status.started(bound)
                        started = True
                    log.info("worker %d (pid %d) listening", index, process.pid)
                code = await process.wait()
            finally:
                if process.stdout is not None:
                    await process.stdout.aclose()
            if stopping.is_set():
                return
            log.warning("worker %d (pid %d) exited with %d; restarting", index, process.pid, code)
            await trio.sleep(RESTART_DELAY)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            await _until_signal(run, workers, processes, signals, stopping)
        finally:  # a worker that failed to start, or our own error: none is left behind
            for process in processes.values():
                if process.returncode is None:
                    process.kill()


async def _until_signal(
    run: Any,
    workers: int,
    processes: dict[int, trio.Process],
    signals: Any,
    stopping: trio.Event,
) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(workers):
            bound = await nursery.start(run, index)
            if index == 0:
                first = bound
        print(*first, sep="\n", flush=True)
        async for signum in signals:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, workers)
            break
        stopping.set()
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for process in processes.values():
                await process.wait()


async def _read_lines(process: trio.Process, lines: int) -> list[str]:
    """The first ``lines`` lines a worker prints (its bound endpoints)."""
    assert process.stdout is not None
    data = b""
    while data.count(b"\n") < lines:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            code = await process.wait()
            raise RuntimeError(f"a worker exited with {code} before it listened")
        data += chunk
    return data.decode().splitlines()[:lines]
