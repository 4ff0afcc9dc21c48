"""The timing sweep's cells, bounds and verdicts (its lab runs are ``make sweep``)."""

from __future__ import annotations

from netns.sweep import PROFILES, SweepCell, SweepResult, cells, quick_cells


def test_the_sweep_covers_every_pair_delay_and_lateness() -> None:
    names = [c.name for c in cells()]
    # 9 pairs x 2 delays x (4 responder latenesses + the initiator late)
    assert len(names) == len(set(names)) == 9 * 2 * 5
    assert "cone-icmp x cone-rst, 25 ms, responder +2000 ms" in names
    assert "cone x cone, 0 ms, initiator +300 ms" in names


def test_the_quick_subset_has_every_pair_once_and_always_a_late_side() -> None:
    quick = quick_cells()
    assert sorted((c.a, c.b) for c in quick) == sorted((a, b) for a in PROFILES for b in PROFILES)
    assert all(c.late_ms > 0 for c in quick)
    assert {c.late for c in quick} == {"responder", "initiator"}


def test_bounds_are_lateness_plus_round_trips() -> None:
    cell = SweepCell("cone", "cone-icmp", 25, "responder", 300)
    assert cell.median_bound_ms == 300 + 4 * 50 + 100
    assert cell.max_bound_ms == 300 + 2000


def test_a_result_fails_on_a_slow_median_a_slow_trial_or_a_problem() -> None:
    cell = SweepCell("cone", "cone", 0, "responder", 300)  # bounds 400 / 2300
    assert SweepResult(cell, (350.0, 360.0, 2000.0), (), 1).ok
    slow_median = SweepResult(cell, (450.0, 460.0, 470.0), (), 1)
    assert slow_median.all_problems == ["median 460 ms > 400 ms"]
    slow_trial = SweepResult(cell, (350.0, 350.0, 2400.0), (), 1)
    assert slow_trial.all_problems == ["max 2400 ms > 2300 ms"]
    failed = SweepResult(cell, (350.0, None), ("trial 1: exit 5/5",), 1)
    assert not failed.ok
    assert failed.connected == 1
