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
        ("symmetric", "symmetric", False),
    ],
)
def test_which_cells_have_a_direct_path(a: str, b: str, direct: bool) -> None:
    assert Cell(a, b).direct is direct


def test_the_matrix_covers_every_ordered_pair_and_the_special_cells() -> None:
    names = [c.name for c in cells()]
    assert len(names) == len(set(names)) == 16 + 2 + 2
    assert {"hairpin", "overlap", "cone-rst x symmetric", "symmetric x cone-rst"} <= set(names)


def _run_with_attempts(times: list[str]) -> PeerRun:
    lines = [
        f"2026-11-22 03:00:{t} punch.race DEBUG punch 1a2b3c4d (initiator) to 'bob': "
        f"attempt {i} to srflx 203.0.113.12:4000"
        for i, t in enumerate(times, 1)
    ]
    return PeerRun("alice", 0, b"", (), "\n".join(lines))


def test_attempts_are_counted_per_candidate_in_a_sliding_second() -> None:
    paced = _run_with_attempts(
        [f"{s:02d},{ms:03d}" for s in range(3) for ms in range(0, 1000, 100)]
    )
    assert max_attempts_per_second(paced) == 10
    burst = _run_with_attempts(["00,000", "00,010", "00,020", "00,990", "02,000"])
    assert max_attempts_per_second(burst) == 4


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("cell", [c for c in cells() if c.asserted], ids=lambda c: c.name)
def test_quick_matrix_cell(cell: Cell) -> None:
    result = run_cell(cell, QUICK_TRIALS)
    assert result.ok, "\n".join(result.problems)
