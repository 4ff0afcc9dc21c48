"""The lab's warm launcher: ``punch`` commands forked from one process that has
imported punch, as the timing sweep runs them (netns/launcher.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns.lab import Lab, missing_requirements
from netns.launcher import Launcher, namespace_of
from netns.scenario import PUNCH, PairRun, run_on_loopback


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    with Launcher() as running:
        yield running


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None: gone; ``Z``: exited, not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_forked_command_prints_what_a_spawned_one_prints(
    launcher: Launcher, tmp_path: Path
) -> None:
    key = tmp_path / "key.pem"
    spawned = subprocess.run([*PUNCH, "id", "--identity", str(key)], capture_output=True)
    out, err = tmp_path / "id.out", tmp_path / "id.err"
    forked = launcher.start(None, ["id", "--identity", str(key)], b"", str(out), str(err))
    assert forked.wait(timeout=30) == 0, err.read_text()
    assert out.read_bytes() == spawned.stdout
    assert len(out.read_text().strip()) > 20


def test_a_forked_command_exits_with_its_own_code(launcher: Launcher, tmp_path: Path) -> None:
    out, err = tmp_path / "x.out", tmp_path / "x.err"
    forked = launcher.start(None, ["no-such-command"], b"", str(out), str(err))
    assert forked.wait(timeout=30) == 2  # argparse's usage error
    assert "invalid choice" in err.read_text()


def test_forked_peers_exchange_their_stdin_lines_on_loopback(launcher: Launcher) -> None:
    alice, bob, _ = run_on_loopback(launcher)
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert alice.received == b"hello from bob\n"
    assert bob.received == b"hello from alice\n"


def test_a_running_command_times_out_is_killed_and_dies_with_the_launcher() -> None:
    with Launcher() as launcher:
        pair = PairRun(launcher=launcher)
        address = pair.start_rendezvous([], "127.0.0.1:0")
        server = pair.processes[-1]
        assert address.startswith("127.0.0.1:")
        with pytest.raises(subprocess.TimeoutExpired):
            server.wait(timeout=0.1)
        server.kill()
        assert server.wait(timeout=10) == -9
        pair.close()
        second = PairRun(launcher=launcher)
        second.start_rendezvous([], "127.0.0.1:0")
        orphan = second.processes[-1].pid
        assert _state(orphan) not in (None, "Z")
    assert _state(orphan) in (None, "Z")  # killed when the launcher's stdin closed


def test_a_prefix_names_its_namespace_or_is_refused() -> None:
    assert namespace_of([]) is None
    assert namespace_of(["ip", "netns", "exec", "pn1-a"]) == "pn1-a"
    with pytest.raises(ValueError, match="not a network namespace prefix"):
        namespace_of(["nsenter", "-t", "1"])


REASON = missing_requirements()


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_forked_command_runs_inside_its_namespace(launcher: Launcher) -> None:
    """An address that exists only in the namespace: the rendezvous binds it there."""
    with Lab() as lab:
        ns = lab.ns("only")
        lab.sh(ns, "ip", "addr", "add", "10.99.0.1/32", "dev", "lo")
        pair = PairRun(launcher=launcher)
        try:
            address = pair.start_rendezvous(lab.exec_prefix(ns), "10.99.0.1:0")
            assert address.startswith("10.99.0.1:")
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=True
            ).stdout.split()
            assert str(pair.processes[-1].pid) in pids
        finally:
            pair.close()
