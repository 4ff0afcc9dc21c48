"""A relayed transfer moves to a direct path when one opens, through real NATs (issue 17).

The full proof (10 trials of 100 MiB) is ``python -m netns.upgrade``; CI runs one
trial of 30 MiB with the relay at 4 MiB/s, so the move (5 s after the connect)
lands mid-transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from netns.lab import missing_requirements
from netns.scenario import PeerRun
from netns.upgrade import judge, run_trial

REASON = missing_requirements()


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_relayed_transfer_moves_to_the_direct_path_once_it_opens(tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    with source.open("wb") as file:
        for _ in range(30):
            file.write(os.urandom(1 << 20))
    trial = run_trial(source, rate="4M")
    assert trial.ok, trial.problems
    assert trial.moved_after is not None
    assert trial.moved_after >= 5.0  # punch._host.UPGRADE_AFTER's first wait


def _run(name: str, *events: dict[str, object], code: int = 0) -> PeerRun:
    return PeerRun(name, code, b"", events, "")


RELAYED = {"event": "connected", "path": "relayed", "elapsed": 1.0}
MOVED = {"event": "moved", "path": "direct", "elapsed": 6.5}


def test_a_trial_needs_the_file_and_both_moves() -> None:
    good = judge(_run("alice", RELAYED, MOVED), _run("bob", RELAYED, MOVED), "ab", "ab", 9.0)
    assert good.ok
    assert good.moved_after == 5.5
    corrupt = judge(_run("alice", RELAYED, MOVED), _run("bob", RELAYED, MOVED), "ac", "ab", 9.0)
    assert not corrupt.ok
    unmoved = judge(_run("alice", RELAYED, MOVED), _run("bob", RELAYED), "ab", "ab", 9.0)
    assert unmoved.problems == ("bob: never moved to a direct path",)
    direct = {**RELAYED, "path": "direct"}
    assert not judge(_run("alice", direct), _run("bob", direct), "ab", "ab", 9.0).ok
