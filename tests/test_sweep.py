"""The timing sweep's cells, bounds and verdicts (its lab runs are ``make sweep``)."""

from __future__ import annotations

from netns.scenario import PeerRun
from netns.sweep import (
    PROFILES,
    SweepCell,
    SweepResult,
    cells,
    failure_cause,
    loss_cells,
    quick_cells,
)


def test_the_sweep_covers_every_pair_delay_and_lateness_and_two_loss_rates() -> None:
    names = [c.name for c in cells()]
    # 9 pairs x 2 delays x (4 responder latenesses + the initiator late), + 2 loss cells
    assert len(names) == len(set(names)) == 9 * 2 * 5 + 2
    assert [c.name for c in loss_cells()] == [
        "cone x cone, 25 ms, 10% loss",
        "cone x cone, 25 ms, 20% loss",
    ]
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


def test_a_loss_cell_counts_trials_in_ten_seconds_against_its_share() -> None:
    ten, twenty = loss_cells()
    assert (ten.required, twenty.required) == (1.0, 0.9)
    assert ten.max_bound_ms == twenty.max_bound_ms == 10_000
    eighteen = (900.0,) * 18 + (None, 12_000.0)  # one failed, one connected too late
    assert SweepResult(twenty, eighteen, (), 1).ok
    seventeen = (None, *eighteen[1:])
    assert SweepResult(twenty, seventeen, (), 1).all_problems == ["17/20 in time, 18 needed"]
    assert SweepResult(ten, eighteen, (), 1).all_problems == ["18/20 in time, 20 needed"]
    assert SweepResult(ten, (900.0,) * 20, (), 1).ok


def _run(name: str, *events: dict[str, object]) -> PeerRun:
    return PeerRun(name, 5, b"", tuple(events), "")


def test_a_failed_trial_is_classified_by_what_each_side_saw() -> None:
    connected = {"event": "connected", "attempts": []}

    def failed(*outcomes: str) -> dict[str, object]:
        attempts = [{"candidate": "srflx 203.0.113.12:4000", "outcome": o} for o in outcomes]
        attempts.append({"candidate": "host 10.0.2.2:4000", "outcome": "refused"})
        return {"event": "error", "error": "punch failed", "attempts": attempts}

    late_nomination = failure_cause(_run("alice", connected), _run("bob", failed("no-answer")))
    assert late_nomination == "responder missed the nomination"
    both = failure_cause(
        _run("alice", failed("refused", "handshake-unfinished", "refused")),
        _run("bob", failed("no-answer")),
    )
    assert both == "srflx attempts: alice refused/handshake-unfinished, bob no-answer"
    no_intro = {"event": "error", "error": "no introduction to 'bob' within 10 s"}
    assert failure_cause(_run("alice", no_intro), _run("bob")) == (
        "alice: no introduction to 'bob' within 10 s"
    )
