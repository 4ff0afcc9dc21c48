"""The NAT behaviour matrix: its logic everywhere, its quick run (3 trials a cell) as root."""

from __future__ import annotations

import pytest
from netns.lab import missing_requirements
from netns.matrix import Cell, cells, max_attempts_per_second, run_cell
from netns.scenario import PeerRun

REASON = missing_requirements()
QUICK_TRIALS = 3


@pytest.mark.parametrize(
    ("a", "b", "direct"),
    [
        ("cone", "cone", True),
        ("cone-rst", "cone", True),
        ("public", "symmetric", True),
        ("symmetric", "public", True),
        ("symmetric", "cone", False),
        ("cone-rst", "symmetric", False),
        ("cone-icmp", "cone-icmp-admin", True),
        ("symmetric", "cone-icmp", False),
        ("symmetric", "symmetric", False),
        ("symmetric+fw6-drop", "symmetric+fw6-reject", True),  # over IPv6
        ("symmetric+fw6-drop", "symmetric", False),  # IPv6 at one site only
        ("none+fw6-drop", "cone", False),  # no family in common
        ("none+fw6-drop", "none+fw6-reject", True),
        ("public", "public", True),
        ("symmetric-seq", "cone", True),  # the cone side predicts its ports (issue 16)
        ("cone-rst", "symmetric-seq", True),
        ("symmetric-seq", "public", True),
        ("symmetric-seq", "symmetric", False),
        ("symmetric-seq", "symmetric-seq", False),
    ],
)
def test_which_cells_have_a_direct_path(a: str, b: str, direct: bool) -> None:
    assert Cell(a, b).direct is direct


def test_the_matrix_covers_every_ordered_pair_and_the_special_cells() -> None:
    names = [c.name for c in cells()]
    assert len(names) == len(set(names)) == 7 * 7 + 2 + 5 + 2
    assert "symmetric+fw6-drop x symmetric+fw6-reject" in names
    assert "none+fw6-drop x none+fw6-reject" in names
    assert {"hairpin", "overlap", "cone-rst x symmetric", "symmetric x cone-rst"} <= set(names)
    assert {"cone-icmp x cone-icmp-admin", "cone-icmp-admin x public"} <= set(names)


def _run_with_attempts(times: list[float]) -> PeerRun:
    """A run whose ``--json`` error event lists an attempt started at each of ``times``."""
    attempts = [
        {"candidate": "srflx 203.0.113.12:4000", "number": i, "started": t, "outcome": "refused"}
        for i, t in enumerate(times, 1)
    ]
    events = ({"event": "error", "code": 5, "attempts": attempts},)
    return PeerRun("alice", 5, b"", events, "")


def test_attempts_are_counted_per_candidate_in_a_sliding_second() -> None:
    paced = _run_with_attempts([s + i / 8 for s in range(3) for i in range(8)])  # exact floats
    assert max_attempts_per_second(paced) == 8
    burst = _run_with_attempts([0.0, 0.25, 0.5, 0.875, 2.0])
    assert max_attempts_per_second(burst) == 4


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("cell", [c for c in cells() if c.asserted], ids=lambda c: c.name)
def test_quick_matrix_cell(cell: Cell) -> None:
    result = run_cell(cell, QUICK_TRIALS)
    assert result.ok, "\n".join(result.problems)
