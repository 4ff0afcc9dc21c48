"""The NAT behaviour matrix: its logic everywhere, its quick run (3 trials a cell) as root."""

from __future__ import annotations

import pytest
from netns.lab import missing_requirements
from netns.matrix import Cell, CellResult, Trial, cells, max_attempts_per_second, run_cell
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
        ("symmetric", "cone", True),  # the birthday paradox (issue 16)
        ("cone-rst", "symmetric", True),
        ("cone-icmp", "cone-icmp-admin", True),
        ("symmetric", "cone-icmp", True),
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
    assert len(names) == len(set(names)) == 7 * 7 + 2 + 5 + 4 + 2
    assert "symmetric x symmetric, relay" in names
    assert "symmetric+fw6-drop x symmetric+fw6-reject" in names
    assert "none+fw6-drop x none+fw6-reject" in names
    assert {"hairpin", "overlap", "cone-rst x symmetric", "symmetric x cone-rst"} <= set(names)
    assert {"cone-icmp x cone-icmp-admin", "cone-icmp-admin x public"} <= set(names)


@pytest.mark.parametrize(
    ("cell", "birthday"),
    [
        (Cell("symmetric", "cone"), True),
        (Cell("cone-icmp-admin", "symmetric"), True),
        (Cell("symmetric", "public"), False),  # the public side is dialled directly
        (Cell("symmetric-seq", "cone"), False),  # predicted
        (Cell("symmetric", "symmetric"), False),
        (Cell("symmetric+fw6-drop", "cone+fw6-reject"), False),  # over IPv6
        (Cell("hairpin", "hairpin"), False),
    ],
)
def test_a_symmetric_nat_against_a_cone_is_a_birthday_cell(cell: Cell, birthday: bool) -> None:
    assert cell.birthday is birthday


@pytest.mark.parametrize(
    ("cell", "paths"),
    [
        (Cell("symmetric", "symmetric"), set()),  # no direct path, no relay: both fail
        (Cell("symmetric", "symmetric", relay=True), {"relayed"}),
        (Cell("symmetric-seq", "symmetric", relay=True), {"relayed"}),
        (Cell("cone", "cone", relay=True), {"direct"}),  # the relay must not win
        (Cell("cone-rst", "symmetric", relay=True), {"direct", "relayed"}),  # birthday vs 2 s
        (Cell("cone", "cone"), {"direct"}),
    ],
)
def test_a_relay_cell_expects_the_relay_only_where_no_direct_path_exists(
    cell: Cell, paths: set[str]
) -> None:
    assert cell.paths == paths
    assert cell.allowed_misses(20) == (2 if cell.birthday and not cell.relay else 0)


def _trial(connected: bool, problems: tuple[str, ...] = ()) -> Trial:
    if not connected and not problems:
        problems = ("exit 5/5: punch failed",)
    return Trial(not problems, problems, connected, 1.0 if connected else None, None, 1.0, 1)


@pytest.mark.parametrize(
    ("cell", "trials", "ok"),
    [
        # a birthday cell asserts a rate: a tenth of its trials may miss, at least one
        (Cell("symmetric", "cone"), [True] * 18 + [False] * 2, True),
        (Cell("symmetric", "cone"), [True] * 17 + [False] * 3, False),
        (Cell("symmetric", "cone"), [True, True, False], True),
        (Cell("symmetric", "cone"), [True, False, False], False),
        (Cell("cone", "cone"), [True, True, False], False),  # every other cell: all trials
    ],
)
def test_a_birthday_cell_may_miss_a_tenth_of_its_trials(
    cell: Cell, trials: list[bool], ok: bool
) -> None:
    assert CellResult(cell, tuple(_trial(t) for t in trials)).ok is ok


def test_a_birthday_trial_that_connected_wrongly_is_never_excused() -> None:
    wrong = _trial(True, ("alice's stream goes to 10.0.0.1:1, not 203.0.113.12",))
    assert not CellResult(Cell("symmetric", "cone"), (wrong, _trial(True))).ok


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
