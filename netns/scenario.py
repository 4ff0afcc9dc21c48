"""Run the real rendezvous and two real ``punch`` processes, and collect what each saw.

Shared by ``make demo`` and the netns tests. Each process runs under an argv
prefix (``ip netns exec NS`` in the lab, nothing on loopback); its stdout and
stderr go to files, so nothing is lost to pipe buffering.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from netns.lab import RENDEZVOUS_PORT, Lab, Topology

PUNCH = [sys.executable, "-m", "punch"]
STARTUP_TIMEOUT = 15.0
"""Seconds the rendezvous gets to print its address, and a listener to register."""
POLL_INTERVAL = 0.02
"""Seconds between looks at a process's output file while waiting (bounded by the timeouts)."""


@attrs.frozen
class PeerRun:
    """What one ``punch`` process did."""

    name: str
    returncode: int | None
    received: bytes
    events: tuple[dict[str, Any], ...]
    stderr: str

    def event(self, kind: str) -> dict[str, Any] | None:
        """The first JSON status event of this kind, if any."""
        return next((e for e in self.events if e.get("event") == kind), None)


def _events(text: str) -> tuple[dict[str, Any], ...]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return tuple(events)


def _wait_for(
    path: Path, found: Callable[[str], bool], process: subprocess.Popen[bytes], what: str
) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if found(text):
            return text
        if process.poll() is not None:
            break
        time.sleep(POLL_INTERVAL)
    raise RuntimeError(f"{what}: not ready within {STARTUP_TIMEOUT:g} s: {path.read_text()!r}")


@attrs.define
class PairRun:
    """Starts the three processes; every one is killed on :meth:`close`."""

    workdir: Path = attrs.field(factory=lambda: Path(tempfile.mkdtemp(prefix="punch-run-")))
    processes: list[subprocess.Popen[bytes]] = attrs.field(factory=list)

    def start(
        self, name: str, prefix: list[str], argv: list[str], stdin: bytes | None = None
    ) -> subprocess.Popen[bytes]:
        out = (self.workdir / f"{name}.out").open("wb")
        err = (self.workdir / f"{name}.err").open("wb")
        process = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=out, stderr=err)
        out.close()
        err.close()
        self.processes.append(process)
        assert process.stdin is not None
        if stdin is not None:
            process.stdin.write(stdin)
        process.stdin.close()
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)

    def result(self, name: str, process: subprocess.Popen[bytes]) -> PeerRun:
        stderr = (self.workdir / f"{name}.err").read_text(errors="replace")
        return PeerRun(
            name,
            process.returncode,
            (self.workdir / f"{name}.out").read_bytes(),
            _events(stderr),
            stderr,
        )

    def run(
        self,
        *,
        rendezvous_prefix: list[str],
        rendezvous_listen: str,
        listener_prefix: list[str],
        connector_prefix: list[str],
        timeout: float = 30.0,
        listener_args: tuple[str, ...] = (),
        connector_args: tuple[str, ...] = (),
        after_rendezvous: Callable[[PairRun, str], None] | None = None,
    ) -> tuple[PeerRun, PeerRun, str]:
        """Rendezvous, then ``bob`` listens, then ``alice`` connects; each sends one line.

        Args:
            listener_args, connector_args: more ``punch`` arguments for bob, alice.
            after_rendezvous: called with this run and the rendezvous address
                once the server is up (to start more processes).

        Returns:
            (alice's run, bob's run, the rendezvous address used).
        """
        server = self.start(
            "rendezvous", rendezvous_prefix, [*PUNCH, "rendezvous", "--listen", rendezvous_listen]
        )
        address = _wait_for(
            self.workdir / "rendezvous.out", lambda t: t.endswith("\n"), server, "rendezvous"
        )
        address = address.strip()
        if after_rendezvous is not None:
            after_rendezvous(self, address)
        common = ["--rendezvous", address, "--json", "--timeout", "10"]
        bob = self.start(
            "bob",
            listener_prefix,
            [*PUNCH, "listen", "--name", "bob", *common, *listener_args],
            b"hello from bob\n",
        )
        _wait_for(self.workdir / "bob.err", lambda t: '"registered"' in t, bob, "bob")
        alice = self.start(
            "alice",
            connector_prefix,
            [*PUNCH, "connect", "bob", "--name", "alice", *common, *connector_args],
            b"hello from alice\n",
        )
        for process in (alice, bob):
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        return self.result("alice", alice), self.result("bob", bob), address


def run_on_loopback() -> tuple[PeerRun, PeerRun, str]:
    """The pair on 127.0.0.1, no namespaces: (alice, bob, rendezvous address)."""
    pair = PairRun()
    try:
        return pair.run(
            rendezvous_prefix=[],
            rendezvous_listen="127.0.0.1:0",
            listener_prefix=[],
            connector_prefix=[],
        )
    finally:
        pair.close()


def run_in_lab(lab: Lab, topology: Topology, **options: Any) -> tuple[PeerRun, PeerRun]:
    """The pair in the lab: rendezvous on the public host, bob at site b, alice at site a.

    ``options`` go to :meth:`PairRun.run` (``listener_args``, ``after_rendezvous``...).
    """
    a, b = topology.sites
    pair = PairRun()
    try:
        alice, bob, _ = pair.run(
            rendezvous_prefix=lab.exec_prefix(topology.rendezvous_ns),
            rendezvous_listen=f"{topology.rendezvous_ip}:{RENDEZVOUS_PORT}",
            listener_prefix=lab.exec_prefix(b.peer_ns),
            connector_prefix=lab.exec_prefix(a.peer_ns),
            **options,
        )
    finally:
        pair.close()
    return alice, bob
