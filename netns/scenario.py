"""Run the real rendezvous and two real ``punch`` processes, and collect what each saw.

Shared by ``make demo`` and the netns tests. Each process runs under an argv
prefix (``ip netns exec NS`` in the lab, nothing on loopback); its stdout and
stderr go to files, so nothing is lost to pipe buffering.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from netns.lab import RENDEZVOUS_PORT, Lab, Site, Topology
from netns.launcher import Forked, Launcher, namespace_of

PUNCH = [sys.executable, "-m", "punch"]
RENDEZVOUS = [*PUNCH, "rendezvous"]
STARTUP_TIMEOUT = 15.0
"""Seconds the rendezvous gets to print its address, and a listener to register."""
POLL_INTERVAL = 0.02
"""Seconds between looks at a process's output file while waiting (bounded by the timeouts)."""
Process = subprocess.Popen[bytes] | Forked
"""A process that :class:`PairRun` started: spawned, or forked by a :class:`Launcher`."""
_RUNS = tempfile.TemporaryDirectory(prefix="punch-runs-")
"""Where every :class:`PairRun` of this process keeps its files: removed when the
process exits (a test, the matrix and the sweep read a run's files after
:meth:`PairRun.close`, so a run's own directory outlives it until then)."""


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


def wait_for(path: Path, found: Callable[[str], bool], process: Process, what: str) -> str:
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

    workdir: Path = attrs.field(
        factory=lambda: Path(tempfile.mkdtemp(prefix="punch-run-", dir=_RUNS.name))
    )
    processes: list[Process] = attrs.field(factory=list)
    launcher: Launcher | None = None
    """Forks each ``punch`` command from this warm process instead of starting
    Python anew (the timing sweep); other programs are still spawned."""

    def start(
        self, name: str, prefix: list[str], argv: list[str], stdin: bytes | None = None
    ) -> Process:
        if self.launcher is not None and argv[: len(PUNCH)] == PUNCH:
            forked = self.launcher.start(
                namespace_of(prefix),
                argv[len(PUNCH) :],
                stdin or b"",
                str(self.workdir / f"{name}.out"),
                str(self.workdir / f"{name}.err"),
            )
            self.processes.append(forked)
            return forked
        out = (self.workdir / f"{name}.out").open("wb")
        err = (self.workdir / f"{name}.err").open("wb")
        process = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True
        )
        out.close()
        err.close()
        self.processes.append(process)
        assert process.stdin is not None
        if stdin is not None:
            process.stdin.write(stdin)
        process.stdin.close()
        return process

    def close(self) -> None:
        """Kill every process started, and whatever each started (the workers of
        ``--workers``): each runs in a session, so a process group, of its own."""
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def result(self, name: str, process: Process) -> PeerRun:
        stderr = (self.workdir / f"{name}.err").read_text(errors="replace")
        return PeerRun(
            name,
            process.returncode,
            (self.workdir / f"{name}.out").read_bytes(),
            _events(stderr),
            stderr,
        )

    def start_rendezvous(
        self, prefix: list[str], listen: str, *args: str, program: Sequence[str] = RENDEZVOUS
    ) -> str:
        """Start ``punch rendezvous`` (more flags in ``args``); return the address it printed.

        ``program`` replaces ``punch rendezvous`` (the lab's lying one: :mod:`netns.liar`).
        """
        argv = [*program, "--listen", listen, *args]
        server = self.start("rendezvous", prefix, argv)
        path = self.workdir / "rendezvous.out"
        return wait_for(path, lambda t: t.endswith("\n"), server, "rendezvous").strip()

    def start_lab_rendezvous(
        self, lab: Lab, topology: Topology, *args: str, program: Sequence[str] = RENDEZVOUS
    ) -> str:
        """:meth:`start_rendezvous` on the lab's rendezvous host, at its well-known port."""
        listen = f"{topology.rendezvous_ip}:{RENDEZVOUS_PORT}"
        prefix = lab.exec_prefix(topology.rendezvous_ns)
        return self.start_rendezvous(prefix, listen, *args, program=program)

    def start_peer(
        self, name: str, prefix: list[str], command: list[str], address: str, *args: str
    ) -> Process:
        """Start ``punch COMMAND --name NAME`` (JSON status) with one line on stdin; for
        ``listen`` and ``receive``, return once it has registered."""
        argv = [*PUNCH, *command, "--name", name, "--rendezvous", address, "--json", *args]
        argv += ["--identity", str(self.workdir / f"{name}.pem")]  # a key of its own, made now
        process = self.start(name, prefix, argv, f"hello from {name}\n".encode())
        if command[0] in ("listen", "receive"):
            wait_for(self.workdir / f"{name}.err", lambda t: '"registered"' in t, process, name)
        return process

    def wait(self, name: str, process: Process, timeout: float) -> PeerRun:
        """Wait for the process to exit by itself (else kill it) and collect its run."""
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        return self.result(name, process)

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
        after_listener: Callable[[], None] | None = None,
        rendezvous_args: tuple[str, ...] = (),
        listener_rendezvous: str | None = None,
        connector_rendezvous: str | None = None,
        running: str | None = None,
    ) -> tuple[PeerRun, PeerRun, str]:
        """Rendezvous, then ``bob`` listens, then ``alice`` connects; each sends one line.

        Args:
            timeout: seconds each peer gets to exit by itself before it is killed.
            listener_args, connector_args: more ``punch`` arguments for bob, alice.
            after_rendezvous: called with this run and the rendezvous address
                once the server is up (to start more processes).
            after_listener: called once bob has registered, before alice starts.
            rendezvous_args: more ``punch rendezvous`` arguments (another ``--listen``).
            listener_rendezvous, connector_rendezvous: the address bob, alice
                give as ``--rendezvous`` (default the one the server printed first).
            running: the address of a rendezvous already running (started by
                another run, :func:`lab_rendezvous`): none is started.

        Returns:
            (alice's run, bob's run, the rendezvous address used).
        """
        if running is None:
            address = self.start_rendezvous(rendezvous_prefix, rendezvous_listen, *rendezvous_args)
            address = address.splitlines()[0]
        else:
            address = running
        if after_rendezvous is not None:
            after_rendezvous(self, address)
        bob = self.start_peer(
            "bob", listener_prefix, ["listen"], listener_rendezvous or address, *listener_args
        )
        if after_listener is not None:
            after_listener()
        alice = self.start_peer(
            "alice",
            connector_prefix,
            ["connect", "bob"],
            connector_rendezvous or address,
            *connector_args,
        )
        return self.wait("alice", alice, timeout), self.wait("bob", bob, timeout), address


def run_on_loopback(launcher: Launcher | None = None) -> tuple[PeerRun, PeerRun, str]:
    """The pair on 127.0.0.1, no namespaces: (alice, bob, rendezvous address); each
    process forked by ``launcher`` if one is given."""
    pair = PairRun(launcher=launcher)
    try:
        return pair.run(
            rendezvous_prefix=[],
            rendezvous_listen="127.0.0.1:0",
            listener_prefix=[],
            connector_prefix=[],
        )
    finally:
        pair.close()


def run_in_lab(
    lab: Lab,
    topology: Topology,
    *,
    rendezvous_args: Sequence[str] = (),
    launcher: Launcher | None = None,
    **options: Any,
) -> tuple[PeerRun, PeerRun]:
    """The pair in the lab: rendezvous on the public host, bob at site b, alice at site a.

    ``rendezvous_args``: more ``punch-rendezvous`` flags (``--relay``...);
    ``launcher``: fork the processes from it (:class:`PairRun`'s); ``options``
    go to :meth:`PairRun.run` (``listener_args``, ``after_rendezvous``, ``running``...).
    """
    a, b = topology.sites
    pair = PairRun(launcher=launcher)
    try:
        alice, bob, _ = pair.run(
            rendezvous_prefix=lab.exec_prefix(topology.rendezvous_ns),
            rendezvous_listen=f"{topology.rendezvous_ip}:{RENDEZVOUS_PORT}",
            listener_prefix=lab.exec_prefix(b.peer_ns),
            connector_prefix=lab.exec_prefix(a.peer_ns),
            rendezvous_args=(*_lab_listen(topology), *rendezvous_args),
            listener_rendezvous=_rendezvous_for(b, topology),
            connector_rendezvous=_rendezvous_for(a, topology),
            **options,
        )
    finally:
        pair.close()
    return alice, bob


def _lab_listen(topology: Topology) -> tuple[str, ...]:
    """A lab rendezvous's second address: its IPv6 one, on the same port."""
    return ("--listen", f"[{topology.rendezvous_ip6}]:{RENDEZVOUS_PORT}")


@contextlib.contextmanager
def lab_rendezvous(
    lab: Lab, topology: Topology, *args: str, launcher: Launcher | None = None
) -> Iterator[str]:
    """One ``punch rendezvous`` on the lab's rendezvous host for many runs (pass the
    address it yields as :func:`run_in_lab`'s ``running``), killed at the end.

    A run then starts two processes, not three (the timing sweep: two cells of
    10 trials took 36.2 s, against 40.6 s with a rendezvous per run). Its runs
    must end their registrations before the next registers the same names with
    new keys: fine without loss, where a closed connection's FIN or RST arrives
    within one WAN crossing, and the next peer's own Register needs a round
    trip after its start (a fork of the :class:`Launcher`, or about 0.3 s of
    Python start). With the launcher, 1,800 trials in two full sweeps never
    met a name still taken.
    """
    server = PairRun(launcher=launcher)
    try:
        address = server.start_lab_rendezvous(lab, topology, *_lab_listen(topology), *args)
        yield address.splitlines()[0]
    finally:
        server.close()


def _rendezvous_for(site: Site, topology: Topology) -> str | None:
    """The IPv6 rendezvous address for an IPv6-only peer; None (the first) for the rest."""
    if site.peer_ip is None:
        return f"[{topology.rendezvous_ip6}]:{RENDEZVOUS_PORT}"
    return None


def run_rendezvous_dies(lab: Lab, topology: Topology) -> tuple[PeerRun, PeerRun, PeerRun]:
    """Introduce the peers, kill the rendezvous before they can connect, then connect again.

    NAT a forwards nothing to site b until the server is dead, so both peers
    hold their introduction but no path yet; then the path opens.

    Returns:
        (alice, bob, carol): carol's ``punch connect`` comes after the server died.
    """
    a, b = topology.sites
    assert a.nat_ns is not None, "site a must be behind a NAT"
    lab.block(a.nat_ns, b.public_ip)
    pair = PairRun()
    try:
        address = pair.start_lab_rendezvous(lab, topology)
        server = pair.processes[-1]
        bob = pair.start_peer("bob", lab.exec_prefix(b.peer_ns), ["listen"], address, "-v")
        alice = pair.start_peer(
            "alice", lab.exec_prefix(a.peer_ns), ["connect", "bob"], address, "-v"
        )
        for name, process in (("alice", alice), ("bob", bob)):
            wait_for(pair.workdir / f"{name}.err", lambda t: "racing accept" in t, process, name)
        server.kill()
        server.wait(timeout=5)
        lab.unblock(a.nat_ns)
        alice_run, bob_run = pair.wait("alice", alice, 30), pair.wait("bob", bob, 30)
        carol = pair.start_peer("carol", lab.exec_prefix(a.peer_ns), ["connect", "bob"], address)
        return alice_run, bob_run, pair.wait("carol", carol, 15)
    finally:
        pair.close()
