"""The timing sweep: every cone-like NAT pair at several WAN delays and introduction skews.

``python -m netns.sweep [--trials N] [--loss-trials N] [--quick] [--cells NAME ...]
[--json PATH] [--readme]``

Real peers get their introductions at different moments (their paths to the
rendezvous differ), sit 1-300 ms apart, and meet NATs that drop, RST or answer
unsolicited SYNs with ICMP. Each cell builds a lab of two NATs
(:data:`PROFILES` x :data:`PROFILES`), a one-way WAN delay (:meth:`Lab.delay`),
and holds one side's introduction back by the cell's lateness
(:meth:`Lab.hold_back`: the rendezvous itself sends both at once, as in
service; a late responder registers first, and only then is held). One
rendezvous serves a cell's trials, and every process is forked from one warm
:class:`netns.launcher.Launcher` (a trial costs 0.15 s, not 0.9 s of Python
starts). Every trial must connect directly, and in time: from the earlier
introduction to the nominated stream, the median within lateness + 4 round
trips + 100 ms, the slowest within lateness + 2 s (issue 12).

Two more cells put cone x cone behind lossy WAN links (:data:`LOSS`): there a
trial counts from the connector's start, Register and introduction included,
must end within 10 s, and a share of trials may fail; each failure is
classified by cause (:func:`failure_cause`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from tools.readme import replace_section

from netns.lab import Lab, build_two_nats
from netns.launcher import Launcher
from netns.matrix import MAX_ATTEMPTS_PER_SECOND, Cell, judge
from netns.scenario import PeerRun, lab_rendezvous, run_in_lab

PROFILES = ("cone", "cone-rst", "cone-icmp")
DELAYS_MS = (0, 25)
"""One-way WAN delays, milliseconds (0: the SYNs' window is microseconds wide)."""
RESPONDER_LATE_MS = (0, 50, 300, 2000)
INITIATOR_LATE_MS = (300,)
LOSS = {10: 1.0, 20: 0.9}
"""Percent of packets each WAN link drops, each way -> the share of trials that
must connect within :data:`LOSS_BOUND_MS` (issue 12: 20/20 at 10%, 18/20 at 20%)."""
LOSS_DELAY_MS = 25
LOSS_BOUND_MS = 10_000
"""From the connector's start, so a Register or an introduction that loss delayed counts."""


@attrs.frozen
class SweepCell:
    """Initiator's NAT ``a``, responder's NAT ``b``, WAN delay, and who is late by how much."""

    a: str
    b: str
    delay_ms: int
    late: str = "responder"
    late_ms: int = 0
    loss_percent: int = 0
    """Dropped by each WAN link, each way (:meth:`Lab.loss`); a loss cell's times run
    from the connector's start and it may miss a share of trials (:data:`LOSS`)."""

    @property
    def name(self) -> str:
        skew = f", {self.late} +{self.late_ms} ms" if self.late_ms else ""
        loss = f", {self.loss_percent}% loss" if self.loss_percent else ""
        return f"{self.a} x {self.b}, {self.delay_ms} ms{skew}{loss}"

    @property
    def required(self) -> float:
        """The share of trials that must connect in time."""
        return LOSS.get(self.loss_percent, 1.0)

    @property
    def round_trip_ms(self) -> float:
        """Between the two sites: twice the one-way delay."""
        return 2.0 * self.delay_ms

    @property
    def median_bound_ms(self) -> float:
        if self.loss_percent:
            return LOSS_BOUND_MS
        return self.late_ms + 4 * self.round_trip_ms + 100

    @property
    def max_bound_ms(self) -> float:
        if self.loss_percent:
            return LOSS_BOUND_MS
        return self.late_ms + 2000


def cells() -> list[SweepCell]:
    """The full sweep: every pair, every delay, each responder lateness, the initiator late."""
    out = []
    for a in PROFILES:
        for b in PROFILES:
            for delay in DELAYS_MS:
                out += [SweepCell(a, b, delay, "responder", ms) for ms in RESPONDER_LATE_MS]
                out += [SweepCell(a, b, delay, "initiator", ms) for ms in INITIATOR_LATE_MS]
    return out + loss_cells()


def loss_cells() -> list[SweepCell]:
    """cone x cone at :data:`LOSS_DELAY_MS` with each loss rate of :data:`LOSS`."""
    return [SweepCell("cone", "cone", LOSS_DELAY_MS, loss_percent=p) for p in LOSS]


def quick_cells() -> list[SweepCell]:
    """For ``make test``: every pair once, each with a lateness and a delay of the sweep."""
    skews = [("responder", 300), ("responder", 50), ("initiator", 300)]
    out = []
    for i, (a, b) in enumerate((a, b) for a in PROFILES for b in PROFILES):
        late, ms = skews[i % len(skews)]
        out.append(SweepCell(a, b, DELAYS_MS[i % len(DELAYS_MS)], late, ms))
    return out


@attrs.frozen
class SweepResult:
    cell: SweepCell
    times_ms: tuple[float | None, ...]
    """Per trial: earlier introduction to nominated stream (a loss cell: the
    connector's start to its stream), or None (no stream on both sides)."""
    problems: tuple[str, ...]
    attempts_per_second: int
    causes: tuple[str, ...] = ()
    """Per failed trial, why (:func:`failure_cause`); a loss cell lists them, and what
    went wrong after a trial connected (the line exchange not done in 30 s under
    loss), instead of counting each as a problem."""

    @property
    def connected(self) -> int:
        return sum(t is not None for t in self.times_ms)

    @property
    def in_time(self) -> int:
        """Trials connected within :attr:`SweepCell.max_bound_ms`."""
        return sum(t is not None and t <= self.cell.max_bound_ms for t in self.times_ms)

    @property
    def median_ms(self) -> float | None:
        times = [t for t in self.times_ms if t is not None]
        return statistics.median(times) if times else None

    @property
    def max_ms(self) -> float | None:
        times = [t for t in self.times_ms if t is not None]
        return max(times) if times else None

    @property
    def ok(self) -> bool:
        return not self.all_problems

    @property
    def all_problems(self) -> list[str]:
        problems = list(self.problems)
        if self.cell.loss_percent:
            needed = math.ceil(self.cell.required * len(self.times_ms))
            if self.in_time < needed:
                problems.append(f"{self.in_time}/{len(self.times_ms)} in time, {needed} needed")
            return problems
        median, slowest = self.median_ms, self.max_ms
        if median is not None and median > self.cell.median_bound_ms:
            problems.append(f"median {median:.0f} ms > {self.cell.median_bound_ms:.0f} ms")
        if slowest is not None and slowest > self.cell.max_bound_ms:
            problems.append(f"max {slowest:.0f} ms > {self.cell.max_bound_ms:.0f} ms")
        return problems

    def summary(self) -> dict[str, Any]:
        median, slowest = self.median_ms, self.max_ms
        return {
            "cell": self.cell.name,
            "trials": len(self.times_ms),
            "connected": self.connected,
            "median_ms": round(median, 1) if median is not None else None,
            "max_ms": round(slowest, 1) if slowest is not None else None,
            "median_bound_ms": self.cell.median_bound_ms,
            "max_bound_ms": self.cell.max_bound_ms,
            "max_attempts_per_second": self.attempts_per_second,
            "failures": dict(Counter(self.causes)),
            "ok": self.ok,
            "problems": self.all_problems,
        }


def failure_cause(alice: PeerRun, bob: PeerRun) -> str:
    """Why a trial gave no stream on both sides, from the peers' ``--json`` events."""
    connected = {run.name: run.event("connected") for run in (alice, bob)}
    if connected["alice"] and not connected["bob"]:
        return "responder missed the nomination"
    if connected["bob"] and not connected["alice"]:
        return "initiator gave up on a nominated stream"
    outcomes = []
    for run in (alice, bob):
        error = run.event("error") or {}
        if "attempts" not in error:
            return f"{run.name}: {error.get('error', 'no status')[:60]}"
        srflx = [a["outcome"] for a in error["attempts"] if a["candidate"].startswith("srflx")]
        outcomes.append(f"{run.name} {'/'.join(dict.fromkeys(srflx)) or 'none'}")
    return "srflx attempts: " + ", ".join(outcomes)


UNLIMITED = ("--registrations-per-minute", "100000", "--introductions-per-minute", "100000")
"""A cell's rendezvous serves all its trials: its per-minute limits must not end them."""


def run_cell(cell: SweepCell, trials: int, launcher: Launcher | None = None) -> SweepResult:
    """Build the cell's lab and run ``trials`` punches of the real peers in it, with
    one rendezvous for them all (a loss cell: one per trial), every process forked
    by ``launcher`` (None: one made for this cell)."""
    times: list[float | None] = []
    problems: list[str] = []
    causes: list[str] = []
    attempts = 0
    with Lab() as lab, contextlib.ExitStack() as stack:
        if launcher is None:
            launcher = stack.enter_context(Launcher())
        shared: dict[str, Any] = {
            "listener_args": ("-vv",),
            "connector_args": ("-vv",),
            "launcher": launcher,
        }
        topology = build_two_nats(lab, cell.a, cell.b)
        if cell.delay_ms:
            lab.delay(cell.delay_ms / 1000)
        for site in topology.sites if cell.loss_percent else ():
            assert site.nat_ns is not None
            lab.loss(site.nat_ns, cell.loss_percent)
        release: Callable[[], None] | None = None
        if cell.late_ms:
            late_site = topology.sites[1 if cell.late == "responder" else 0]
            held = topology.rendezvous_ns, late_site.public_ip
            # A late responder registers at its path's own speed, then its introduction
            # is held (registering held back cost it three times the lateness, and the
            # sweep 20 minutes); a late initiator registers just before it asks.
            late_listener = cell.late == "responder"
            lab.hold_back(*held, cell.late_ms / 1000, engaged=not late_listener)
            if late_listener:
                shared["after_listener"] = functools.partial(lab.engage_hold, *held)
                release = functools.partial(lab.engage_hold, *held, engaged=False)
        if not cell.loss_percent:  # under loss a killed peer's RST may be lost, and its
            # name stay registered for the next trial's: there, a rendezvous per trial
            shared["running"] = stack.enter_context(
                lab_rendezvous(lab, topology, *UNLIMITED, launcher=launcher)
            )
        for i in range(trials):
            start = time.monotonic()
            try:
                alice, bob = run_in_lab(lab, topology, **shared)
            except RuntimeError as exc:
                times.append(None)
                causes.append("the listener did not register")
                if not cell.loss_percent:
                    problems.append(f"trial {i}: did not start: {exc}")
                continue
            finally:
                if release is not None:
                    release()  # the next listener registers fast
            trial = judge(Cell(cell.a, cell.b), topology, alice, bob, time.monotonic() - start)
            attempts = max(attempts, trial.attempts_per_second)
            if not trial.connected:
                causes.append(failure_cause(alice, bob))
            if cell.loss_percent:  # the verdict is the share connected in time; the rest is told
                if trial.connected:
                    causes += [f"connected, then {p}" for p in trial.problems]
            else:
                problems += [f"trial {i}: {p}" for p in trial.problems]
            earlier = bob if cell.late == "initiator" and cell.late_ms else alice
            connected = earlier.event("connected") if trial.connected else None
            times.append(_time_ms(cell, connected) if connected else None)
    if attempts > MAX_ATTEMPTS_PER_SECOND:
        problems.append(f"{attempts} attempts/s to one candidate")
    return SweepResult(cell, tuple(times), tuple(problems), attempts, tuple(causes))


def _time_ms(cell: SweepCell, connected: dict[str, Any]) -> float:
    """A trial's time: from the introduction, or for a loss cell from the process start."""
    return float(connected["elapsed" if cell.loss_percent else "connect_time"]) * 1000


def table(results: list[SweepResult]) -> str:
    rows = [
        "| cell | trials | connected | median ms (bound) | max ms (bound) | attempts/s "
        "| failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        median = "-" if s["median_ms"] is None else s["median_ms"]
        slowest = "-" if s["max_ms"] is None else s["max_ms"]
        failures = "; ".join(f"{n}x {cause}" for cause, n in s["failures"].items()) or "-"
        rows.append(
            f"| {s['cell']} | {s['trials']} | {s['connected']}/{s['trials']} "
            f"| {median} ({s['median_bound_ms']:g}) | {slowest} ({s['max_bound_ms']:g}) "
            f"| {s['max_attempts_per_second']} | {failures} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netns.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--trials", type=int, default=10, help="trials per cell (default 10)")
    parser.add_argument(
        "--loss-trials", type=int, default=20, help="trials per loss cell (default 20)"
    )
    parser.add_argument("--quick", action="store_true", help="only the quick subset of cells")
    parser.add_argument("--cells", nargs="*", help="only these cells, by name")
    parser.add_argument(
        "--json", type=Path, default=Path("netns/sweep.json"), help="where to write the JSON"
    )
    parser.add_argument("--readme", action="store_true", help="update README.md's sweep table")
    args = parser.parse_args(argv)
    chosen = quick_cells() if args.quick else cells()
    chosen = [c for c in chosen if not args.cells or c.name in args.cells]
    results = []
    with Launcher() as launcher:
        for cell in chosen:
            trials = args.loss_trials if cell.loss_percent else args.trials
            result = run_cell(cell, trials, launcher)
            results.append(result)
            s = result.summary()
            print(
                f"{cell.name:45} {s['connected']}/{s['trials']} median {s['median_ms']} "
                f"max {s['max_ms']} {'ok' if result.ok else 'PROBLEM'}",
                file=sys.stderr,
                flush=True,
            )
    markdown = table(results)
    print(markdown)
    args.json.write_text(json.dumps([r.summary() for r in results], indent=2) + "\n")
    if args.readme:
        stamp = datetime.date.today().isoformat()
        replace_section(
            "timing-sweep",
            f"_Generated by `python -m netns.sweep {' '.join(argv or sys.argv[1:])}` on {stamp}; "
            "times from the earlier introduction to the nominated stream (a loss cell: from "
            "the connector's start, Register and introduction included)._\n\n" + markdown,
        )
    for result in results:
        for problem in result.all_problems:
            print(f"PROBLEM {result.cell.name}: {problem}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
