"""Issue 17's lab proof: a transfer that starts relayed moves to a direct path mid-way.

``python -m netns.upgrade [--trials N] [--mib M] [--rate BYTES]``

Two cone NATs; NAT a forwards nothing to site b's public address (an nft
rule), so no direct path exists and ``punch send`` gets a relayed stream
from the rendezvous's relay (after its 2 s stagger). As soon as alice reports
``connected`` (relayed), the rule is lifted. Her host tries to move the
stream 5 s later (:data:`punch._host.UPGRADE_AFTER`); the relay's rate
(``--relay-rate``) keeps the transfer going until then. Each trial must end
with the file verified by SHA-256 on both sides (``punch receive`` checks it
before it saves), both peers' stream first relayed and then ``moved``, and
the bytes after the move over the direct path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs

from netns.lab import Lab, build_two_nats
from netns.scenario import PairRun, PeerRun, wait_for

RATE = "10M"
"""The relay's rate per direction in the lab: 100 MiB take 10 s relayed, so the
move (5 s after the connect) lands mid-transfer."""


@attrs.frozen
class Trial:
    ok: bool
    problems: tuple[str, ...]
    seconds: float
    moved_after: float | None
    """Seconds from alice's ``connected`` to her ``moved``."""


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def run_trial(source: Path, rate: str = RATE) -> Trial:
    """One transfer of ``source`` from alice (site a) to bob (site b), judged."""
    started = time.monotonic()
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="punch-upgrade-") as out:
        topology = build_two_nats(lab)
        a, b = topology.sites
        assert a.nat_ns is not None
        pair = PairRun()
        try:
            address = pair.start_lab_rendezvous(
                lab,
                topology,
                "--relay",
                "--relay-rate",
                rate,
                "--relay-max-bytes-per-peer-hour",
                "1T",
            )
            bob = pair.start_peer(
                "bob", lab.exec_prefix(b.peer_ns), ["receive", "--out", out], address, "-v"
            )
            lab.block(a.nat_ns, b.public_ip)  # no direct path: only the relay connects them
            alice = pair.start_peer(
                "alice",
                lab.exec_prefix(a.peer_ns),
                ["send", str(source), "--to", "bob"],
                address,
                "-v",
            )
            wait_for(pair.workdir / "alice.err", lambda t: '"connected"' in t, alice, "alice")
            lab.unblock(a.nat_ns)  # a direct path from now on
            alice_run, bob_run = pair.wait("alice", alice, 120), pair.wait("bob", bob, 30)
        finally:
            pair.close()
        received = Path(out) / source.name
        digest = _sha256(received) if received.exists() else None
    return judge(alice_run, bob_run, digest, _sha256(source), time.monotonic() - started)


def judge(alice: PeerRun, bob: PeerRun, received: str | None, sent: str, seconds: float) -> Trial:
    """Both exited 0, the file arrived whole, and each stream went relayed, then direct."""
    problems: list[str] = []
    if (alice.returncode, bob.returncode) != (0, 0):
        error = alice.event("error") or bob.event("error") or {}
        problems.append(f"exit {alice.returncode}/{bob.returncode}: {error.get('error')}")
    if received != sent:
        problems.append(f"received SHA-256 {received}, sent {sent}")
    for run in (alice, bob):
        connected, moved = run.event("connected"), run.event("moved")
        if not connected or connected.get("path") != "relayed":
            problems.append(f"{run.name}: not connected relayed: {connected}")
        if not moved or moved.get("path") != "direct":
            problems.append(f"{run.name}: never moved to a direct path")
    moved_after = None
    times = [e.get("elapsed") for e in alice.events if e["event"] in ("connected", "moved")]
    if len(times) == 2 and None not in times:
        moved_after = times[1] - times[0]
    return Trial(not problems, tuple(problems), seconds, moved_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns.upgrade", description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--mib", type=int, default=100, help="the file's size, MiB")
    parser.add_argument("--rate", default=RATE, help=f"the relay's rate (default {RATE})")
    parser.add_argument("--json", type=Path, help="write the trials here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="punch-upgrade-src-") as where:
        source = Path(where) / "payload.bin"
        with source.open("wb") as file:
            for _ in range(args.mib):
                file.write(os.urandom(1 << 20))
        trials = []
        for number in range(args.trials):
            trial = run_trial(source, args.rate)
            trials.append(trial)
            print(
                f"trial {number}: {'ok' if trial.ok else 'FAILED'} in {trial.seconds:.1f} s, "
                f"moved {trial.moved_after} s after the connect; {'; '.join(trial.problems)}",
                flush=True,
            )
    moved = [t.moved_after for t in trials if t.moved_after is not None]
    ok = sum(t.ok for t in trials)
    print(
        f"{ok}/{len(trials)} trials: {args.mib} MiB verified, relayed then moved to direct"
        + (f"; moved a median {statistics.median(moved):.2f} s after the connect" if moved else "")
    )
    if args.json is not None:
        args.json.write_text(json.dumps([attrs.asdict(t) for t in trials], indent=1) + "\n")
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
