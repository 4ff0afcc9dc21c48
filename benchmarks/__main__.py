"""Run every benchmark, print one table, write ``benchmarks/results.json``.

``python -m benchmarks [--quick] [--readme] [--json PATH]`` (``make bench``;
root, for the netns lab). Every figure is a median (p95 where given) of one
run, and every target a ratio to a baseline measured in the same run:
absolute times are printed, never asserted. ``--quick`` runs few trials and
small sizes, to check that the suite works, not to quote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from netns.lab import missing_requirements
from tools.readme import replace_section

from benchmarks import capacity, cluster
from benchmarks.lab import (
    cold_start,
    families,
    families_summary,
    round_trips,
    shaped_throughput,
    time_to_stream,
    worst_timing,
)

RESULTS = Path(__file__).parent / "results.json"
TARGET_PEERS = 100_000
SKEW = 0.3
"""Seconds the responder's introduction is held back in the worst-timing run."""
ROUND_TRIPS = (0.010, 0.050)
"""Seconds between the sites in the round-trip runs (issue 12: two round trips)."""
SHAPED_RATE = 1_000_000_000
"""Bit/s of each site's WAN link in the shaped throughput run: a gigabit access line."""
FLOWS = ("punched", "sslstream", "plain", "raw", "relayed", "relayed-plain")
"""The throughput flows of the bare-veth run (:data:`benchmarks.peer.FLOWS` and its baselines)."""
SHAPED_FLOWS = ("punched", "relayed")
"""The flows of the shaped run."""
FULL = {
    "trials": 50,
    "rt_trials": 20,
    "skew_trials": 20,
    "cold_trials": 20,
    "family_trials": 20,
    "rounds": 5,
    "bytes": 1 << 30,
    "shaped_bytes": 1 << 28,
    "peers": (10_000, 50_000, 100_000),
    "skew_attempts": 200,
    "pairs": 500,
    "seconds": 5.0,
    "speedup_rounds": 5,
    "circuits": 1000,
}
QUICK = {
    "trials": 5,
    "rt_trials": 3,
    "skew_trials": 3,
    "cold_trials": 3,
    "family_trials": 3,
    "rounds": 1,
    "bytes": 64 << 20,
    "shaped_bytes": 16 << 20,
    "peers": (1_000, 2_000),
    "skew_attempts": 30,
    "pairs": 50,
    "seconds": 1.0,
    "speedup_rounds": 1,
    "circuits": 50,
}


def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def run(size: dict[str, Any]) -> dict[str, Any]:
    """Every measurement of issue 5, as one JSON-able dict of raw samples and summaries."""
    cone = time_to_stream(size["trials"], size["rounds"], size["bytes"])
    shaped = shaped_throughput(SHAPED_RATE, size["rounds"], size["shaped_bytes"], SHAPED_FLOWS)
    rst = worst_timing(size["skew_trials"], SKEW)
    delayed = {rt: round_trips(size["rt_trials"], rt) for rt in ROUND_TRIPS}
    cold = cold_start(size["cold_trials"])
    by_family = families(size["family_trials"])
    peers = capacity.idle_peers(size["peers"])
    intros = capacity.introductions(size["pairs"], size["seconds"])
    accepts = capacity.accept_and_close(2 * size["pairs"], size["seconds"])
    relay_memory = capacity.relay_memory(size["circuits"])
    scale_out = cluster.run(
        size["pairs"],
        size["seconds"],
        size["skew_attempts"],
        size["peers"][0],
        size["speedup_rounds"],
    )

    def both(trial: dict[str, Any]) -> float:  # both sides hold a verified stream
        return max(trial["alice"]["connect_time"], trial["bob"]["connect_time"])

    connected = [t for t in cone["punch"] if "failed" not in t]
    skewed_ok = [t for t in rst["punch"] if "failed" not in t]
    punch = [both(t) for t in connected]
    direct = [t["alice"]["connect_time"] for t in cone["direct"]]
    skewed = [both(t) for t in skewed_ok] or [float("nan")]
    attempts = [max(t["alice"]["attempts_per_s"], t["bob"]["attempts_per_s"]) for t in skewed_ok]
    summary = {
        "time_to_stream": {
            "punch_median": median(punch),
            "punch_p95": p95(punch),
            "direct_median": median(direct),
            "direct_p95": p95(direct),
            "ratio": median(punch) / median(direct),
            "target": 1.3,
            "won_by": sorted({t["alice"]["won_by"] for t in connected}),
            "connected": len(connected),
            "trials": len(cone["punch"]),
        },
        "worst_timing": {
            "median": median(skewed),
            "limit": 2 * median(punch) + SKEW,
            "ratio": median(skewed) / (2 * median(punch) + SKEW),
            "target": 1.0,
            "attempts_per_s_max": max(attempts, default=0),
            "attempts_target": 20,
            "connected": len(skewed_ok),
            "trials": len(rst["punch"]),
        },
        "cold_start": {
            "first_byte_median": median(cold["first_byte"]),
            "interpreter_median": median(cold["interpreter"]),
            "import_median": median(cold["import"]) - median(cold["interpreter"]),
        },
        "throughput": _rates(cone["throughput"], FLOWS)
        | {"target": 0.97, "tls_target": 0.95, "relay_target": 0.8},
        "shaped_throughput": _rates(shaped["throughput"], SHAPED_FLOWS) | {"rate": SHAPED_RATE},
        "capacity": {
            "baseline_rss": peers["baseline_rss"],
            "points": peers["points"],
            "target_rss": 1 << 30,
            "fd_limit": peers["fd_limit"],
            "introductions_per_s": intros["per_second"],
            "accepts_per_s": accepts["per_second"],
            "ratio": intros["per_second"] / accepts["per_second"],
            "server_cpu": {"introductions": intros["server_cpu"], "accepts": accepts["server_cpu"]},
        },
        "relay_memory": relay_memory,
        "cluster": scale_out,
        "cpu_per_punch": median([t["cpu"] for t in connected]),
        "families": families_summary(by_family),
        "round_trips": [_round_trip_summary(rt, report) for rt, report in delayed.items()],
    }
    samples = {
        "cone": cone,
        "shaped": shaped,
        "cone_rst_skewed": rst,
        "cold": cold,
        "families": by_family,
    }
    samples |= {f"cone_rtt_{rt * 1000:.0f}ms": report for rt, report in delayed.items()}
    return {"summary": summary, "samples": samples}


def _rates(report: dict[str, Any], flows: tuple[str, ...]) -> dict[str, Any]:
    """GiB/s at the median round, per direction and flow, of one throughput report
    (:func:`benchmarks.peer.throughput`), and its GiB per round."""
    gib = report["bytes"] / (1 << 30)
    rates = {d: {f: gib / median(report[f][d]) for f in flows} for d in ("up", "down")}
    return rates | {"gib_per_round": gib}


def _shaped_rows(
    shaped: dict[str, Any] | None, direction: str, label: str, rounds: int, target: float
) -> list[tuple[str, ...]]:
    """The relayed against punched row on shaped site links, where the run has one."""
    if shaped is None:
        return []
    flow = shaped[direction]
    ratio = flow["relayed"] / flow["punched"]

    def gbit(gib_per_s: float) -> str:
        return f"{gib_per_s * 8 * 2**30 / 1e9:.3f} Gbit/s"

    return [
        (
            f"throughput {label}, relayed, TLS 1.3, each site's link shaped to "
            f"{shaped['rate'] / 1e9:g} Gbit/s, {shaped['gib_per_round'] * 1024:g} MiB x {rounds}",
            f"{gbit(flow['relayed'])} relayed",
            f"punched {gbit(flow['punched'])}",
            f"{ratio:.2f}",
            f">= {target}: {verdict(ratio >= target)}",
        )
    ]


def _round_trip_summary(round_trip: float, report: dict[str, Any]) -> dict[str, Any]:
    """Medians in round trips: initiator and responder, introduction to nominated stream
    (the punch, TLS left out), then TLS on it; and the same for the direct baseline."""
    ok = [t for t in report["punch"] if "failed" not in t]

    def punch_part(side: dict[str, Any]) -> float:
        return float(side["connect_time"] - side["tls_time"])

    initiator = median([punch_part(t["alice"]) for t in ok])
    responder = median([punch_part(t["bob"]) for t in ok])
    direct = median([punch_part(t["alice"]) for t in report["direct"]])
    return {
        "round_trip": round_trip,
        "connected": len(ok),
        "trials": len(report["punch"]),
        "initiator": initiator,
        "responder": responder,
        "direct": direct,
        "ratio": initiator / direct,
        "initiator_limit": 2 * round_trip + 0.005,
        "responder_limit": 2.5 * round_trip + 0.005,
        "initiator_tls": median([t["alice"]["tls_time"] for t in ok]),
        "responder_tls": median([t["bob"]["tls_time"] for t in ok]),
        "tls_limit": round_trip + 0.005,
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def verdict(ok: bool) -> str:
    return "holds" if ok else "**missed**"


def table(summary: dict[str, Any], trials: dict[str, Any]) -> str:
    """The results as a Markdown table: measure, figure, baseline, ratio, target."""
    t, w, c = summary["time_to_stream"], summary["worst_timing"], summary["cold_start"]
    tp, cap = summary["throughput"], summary["capacity"]
    shaped = summary.get("shaped_throughput")  # absent from runs before 2026-12-04
    top = cap["points"][-1]
    rows = [
        (
            f"time to encrypted stream, cone x cone ({t['connected']}/{t['trials']} connected)",
            f"{ms(t['punch_median'])} (p95 {ms(t['punch_p95'])})",
            f"direct connect + handshake + TLS {ms(t['direct_median'])} "
            f"(p95 {ms(t['direct_p95'])})",
            f"{t['ratio']:.2f}",
            f"<= {t['target']}: {verdict(t['ratio'] <= t['target'])}",
        ),
        (
            f"cone-rst x cone-rst, responder {SKEW * 1000:.0f} ms late "
            f"({w['connected']}/{w['trials']} connected)",
            ms(w["median"]),
            f"2 x cone median + skew = {ms(w['limit'])}",
            f"{w['ratio']:.2f}",
            f"<= 1: {verdict(w['ratio'] <= 1)}",
        ),
        (
            "connect attempts per candidate per second (same run)",
            f"{w['attempts_per_s_max']} at most",
            "",
            "",
            f"<= 20: {verdict(w['attempts_per_s_max'] <= 20)}",
        ),
        (
            f"cold start: `punch connect` to first byte ({trials['cold_trials']} runs)",
            ms(c["first_byte_median"]),
            f"interpreter start {ms(c['interpreter_median'])}; "
            f"`import punch._cli` {ms(c['import_median'])} more",
            "",
            "reported",
        ),
    ]
    for direction, label in (("up", "alice to bob"), ("down", "bob to alice")):
        flow = tp[direction]
        tls_ratio, ratio = flow["punched"] / flow["sslstream"], flow["plain"] / flow["raw"]
        rows += [
            (
                f"throughput {label}, TLS 1.3, {tp['gib_per_round']:g} GiB x {trials['rounds']}",
                f"{flow['punched']:.2f} GiB/s punched",
                f"trio.SSLStream over raw TCP {flow['sslstream']:.2f} GiB/s; "
                f"plaintext punched {flow['plain']:.2f} GiB/s",
                f"{tls_ratio:.2f}",
                f">= {tp['tls_target']}: {verdict(tls_ratio >= tp['tls_target'])}",
            ),
            (
                f"throughput {label}, relayed (issue 17), TLS 1.3, bare veth links "
                "(CPU-bound: the relay's TCP and the extra hops share the peers' cores)",
                f"{flow['relayed']:.2f} GiB/s relayed",
                f"punched {flow['punched']:.2f} GiB/s; plaintext relayed "
                f"{flow['relayed-plain']:.2f}, punched {flow['plain']:.2f}",
                f"{flow['relayed'] / flow['punched']:.2f}",
                f">= {tp['relay_target']}: "
                f"{verdict(flow['relayed'] / flow['punched'] >= tp['relay_target'])}",
            ),
            (
                f"throughput {label}, plaintext (`encrypt=False`)",
                f"{flow['plain']:.2f} GiB/s punched",
                f"raw trio.SocketStream {flow['raw']:.2f} GiB/s",
                f"{ratio:.2f}",
                f">= {tp['target']}: {verdict(ratio >= tp['target'])}",
            ),
        ]
        rows += _shaped_rows(shaped, direction, label, trials["rounds"], tp["relay_target"])
    if top["peers"] < TARGET_PEERS:  # the descriptor limit stopped us: extrapolate
        projected = cap["baseline_rss"] + top["per_peer"] * TARGET_PEERS
        rows.append(
            (
                f"rendezvous: {TARGET_PEERS:,} peers, projected from {top['peers']:,} "
                f"(RLIMIT_NOFILE here: {cap['fd_limit']:,})",
                f"RSS {projected / 2**20:.0f} MiB",
                "",
                f"{projected / cap['target_rss']:.2f} of 1 GiB",
                f"< 1 GiB: {verdict(projected < cap['target_rss'])} (projected)",
            )
        )
    relay = summary["relay_memory"]
    rows.append(
        (
            f"relay: memory per relayed stream, {relay['circuits']:,} streams, each writer "
            f"pouring {relay['poured_per_circuit'] / 2**20:.1f} MiB into a reader that never reads",
            f"RSS +{relay['full_per_circuit'] / 1024:.0f} KiB per stream",
            f"bound and idle +{relay['bound_per_circuit'] / 1024:.0f} KiB per stream",
            f"{relay['full_per_circuit'] / relay['target_per_circuit']:.2f}",
            f"<= 2 x 64 KiB: {verdict(relay['full_per_circuit'] <= relay['target_per_circuit'])}",
        )
    )
    for point in cap["points"]:
        rows.append(
            (
                f"rendezvous: {point['peers']:,} idle peers with keepalives",
                f"RSS {point['rss'] / 2**20:.0f} MiB ({point['per_peer'] / 1024:.1f} KiB/peer)",
                f"empty server {cap['baseline_rss'] / 2**20:.0f} MiB",
                f"{point['rss'] / cap['target_rss']:.2f} of 1 GiB" if point is top else "",
                f"< 1 GiB: {verdict(point['rss'] < cap['target_rss'])}"
                if point is top and top["peers"] >= TARGET_PEERS
                else "",
            )
        )
    for r in summary["round_trips"]:
        rt = r["round_trip"]
        held = r["initiator"] <= r["initiator_limit"] and r["responder"] <= r["responder_limit"]
        rows.append(
            (
                f"cone x cone at {rt * 1000:.0f} ms round trips ({r['connected']}/{r['trials']} "
                "connected): the punch (TLS left out), initiator; responder",
                f"{ms(r['initiator'])} ({r['initiator'] / rt:.2f} RT); "
                f"{ms(r['responder'])} ({r['responder'] / rt:.2f} RT)",
                f"direct connect + the same handshake {ms(r['direct'])} "
                f"({r['direct'] / rt:.2f} RT)",
                f"{r['ratio']:.2f}",
                f"<= 2 RT + 5 ms and <= 2.5 RT + 5 ms: {verdict(held)}; "
                f"ratio <= 1: {verdict(r['ratio'] <= 1)}",
            )
        )
        tls_held = max(r["initiator_tls"], r["responder_tls"]) <= r["tls_limit"]
        rows.append(
            (
                f"TLS 1.3 after that punch at {rt * 1000:.0f} ms round trips: initiator; responder",
                f"{ms(r['initiator_tls'])} ({r['initiator_tls'] / rt:.2f} RT); "
                f"{ms(r['responder_tls'])} ({r['responder_tls'] / rt:.2f} RT)",
                "",
                "",
                f"<= 1 RT + 5 ms: {verdict(tls_held)}",
            )
        )
    rows += _family_rows(summary.get("families"))  # absent from runs before issue 15
    rows += cluster.rows(summary.get("cluster"), cap["introductions_per_s"], verdict)
    rows += [
        (
            f"rendezvous: introductions/s, {2 * trials['pairs']} peers pairing",
            f"{cap['introductions_per_s']:,.0f}/s",
            f"trio accept-and-close loop {cap['accepts_per_s']:,.0f}/s",
            f"{cap['ratio']:.2f}",
            "reported",
        ),
        (
            "CPU per punch (one peer, `Host.connect`, cone x cone)",
            ms(summary["cpu_per_punch"]),
            "",
            "",
            "reported",
        ),
    ]
    lines = [
        "| measure | figure | baseline, same run | ratio | target |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _family_rows(f: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """The IPv6 vs IPv4 rows (issue 15), or none for a run without them."""
    if f is None:
        return []
    return [
        (
            f"IPv6 vs IPv4, cone+fw6-drop at both sites, 10 ms round trips, `-6` / `-4` "
            f"({f['trials']} trials each, interleaved): introduction to nominated stream",
            f"IPv6 {ms(f['ipv6_median'])}",
            f"IPv4 {ms(f['ipv4_median'])}",
            f"{f['ratio']:.2f}",
            f"<= {f['target']}: {verdict(f['ratio'] <= f['target'])}",
        ),
        (
            "dual stack with IPv6 black-holed between the sites (IPv4 after the stagger)",
            ms(f["ipv6_black_holed_median"]),
            f"stagger {ms(f['stagger'])} + IPv4 = {ms(f['black_holed_limit'])}",
            f"{f['black_holed_ratio']:.2f}",
            f"<= 1: {verdict(f['black_holed_ratio'] <= 1)}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few trials, small sizes")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--readme", action="store_true", help="write the README section")
    parser.add_argument(
        "--render", action="store_true", help="measure nothing: print (--readme: write) --json"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.json.read_text())
        size = QUICK if results["meta"]["quick"] else FULL
    else:
        problem = missing_requirements()
        if problem is not None:
            print(f"benchmarks: {problem}", file=sys.stderr)
            return 2
        size = QUICK if args.quick else FULL
        results = run(size)
        results["meta"] = {
            "date": datetime.date.today().isoformat(),
            "quick": args.quick,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": len(os.sched_getaffinity(0)),
        }
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    markdown = table(results["summary"], size)
    print(markdown)
    if args.readme:
        meta = results["meta"]
        replace_section(
            "performance",
            f"One run of `make bench` on {meta['date']} (Linux {meta['kernel']}, "
            f"{meta['cpus']} CPUs, Python {meta['python']}); medians unless "
            "marked p95.\n\n" + markdown,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
