"""Build hosts and NAT routers from network namespaces, veth pairs and nftables.

Every namespace name carries a per-run prefix, so parallel runs never collide,
and :class:`Lab` deletes each one by name on exit, pass, fail or Ctrl-C.
Traffic stays inside the namespaces: the WAN is a router in its own namespace,
with addresses from the documentation ranges 203.0.113.0/24 (RFC 5737) and
2001:db8::/32 (RFC 3849), private IPv4 LANs in 10.0.0.0/8, and a /64 of
2001:db8::/32 per IPv6 site (``2001:db8:<site>::/64``), behind a stateful
IPv6 firewall instead of a NAT.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import attrs

RULESETS = Path(__file__).parent / "rulesets"
DELAY_LINE = Path(__file__).parent / "delay.py"
WAN_PREFIX = "203.0.113"
WAN6_PREFIX = "2001:db8"
RENDEZVOUS_IP = f"{WAN_PREFIX}.10"
RENDEZVOUS_IP6 = f"{WAN6_PREFIX}::10"
RENDEZVOUS_PORT = 7000  # rulesets/symmetric.nft maps this port apart


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "the netns lab needs root (ip netns, nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the netns lab needs {tool!r} (apt-get install iproute2 nftables)"
    return None


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@attrs.define
class Lab:
    """A set of namespaces that exists for one run, then is deleted by name.

    Use as a context manager; ``SIGTERM`` inside it tears down as ``Ctrl-C`` does.
    """

    prefix: str = attrs.field(factory=lambda: f"pn{os.getpid() % 10000}{secrets.token_hex(2)}-")
    namespaces: list[str] = attrs.field(factory=list)
    wan_ports: dict[str, str] = attrs.field(factory=dict)
    """namespace -> the name of its link on the WAN router (in the ``wan`` namespace)."""
    _previous_sigterm: object = None
    _helpers: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    _holds: dict[tuple[str, str], tuple[str, ...]] = attrs.field(factory=dict)
    """(source namespace, destination IP) -> the ``ip rule`` of its :meth:`hold_back`."""
    _engaged: set[tuple[str, str]] = attrs.field(factory=set)

    def __enter__(self) -> Lab:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]

    def close(self) -> None:
        """Kill what runs in the namespaces and delete them; never raises."""
        for ns in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for helper in self._helpers:
            helper.kill()
            helper.wait()
            if helper.stdout is not None:
                helper.stdout.close()
        self._helpers.clear()

    def ns(self, name: str) -> str:
        """Create namespace ``prefix + name`` with loopback up; return its full name."""
        full = self.prefix + name
        _run(["ip", "netns", "add", full])
        self.namespaces.append(full)
        self.sh(full, "ip", "link", "set", "lo", "up")
        # No IPv6 duplicate address detection on the links made next: else each
        # link-local address stays tentative for about 2 s (RFC 4862 §5.4), and
        # the first packets to a neighbour wait or die meanwhile (the lab's first
        # IPv6 connect took 2 s, a punch 1 s, against 0.3 ms once it settled)
        for conf in ("all", "default"):
            self.sh(full, "sysctl", "-q", "-w", f"net.ipv6.conf.{conf}.accept_dad=0")
        # Trials independent of each other: Linux caches each destination's RTT when
        # a connection closes cleanly and starts the next connection's RTO at three
        # times it (tcp_metrics; commit 1b7fdd2, "do not use cached RTT for RTT
        # estimation"). A lossy trial's RTT, inflated by its retransmitted SYNs
        # (seconds), so slowed the next trials to the same peer: at 20% loss the
        # next connections started with RTOs of 4-8 s, and TLS after the punch took
        # a median 1.34 s against 0.57 s with nothing cached (20 trials each).
        self.sh(full, "sysctl", "-q", "-w", "net.ipv4.tcp_no_metrics_save=1")
        return full

    def sh(self, ns: str, *argv: str, stdin: str | None = None) -> str:
        """Run a command inside ``ns`` and return its stdout; raise on failure."""
        return _run(["ip", "netns", "exec", ns, *argv], stdin)

    def exec_prefix(self, ns: str) -> list[str]:
        """The argv prefix that runs a command inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def link(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair: ``if_a`` in ``ns_a`` and ``if_b`` in ``ns_b``, both up."""
        _run(
            [
                "ip",
                "link",
                "add",
                if_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                if_b,
                "netns",
                ns_b,
            ]
        )
        self.sh(ns_a, "ip", "link", "set", if_a, "up")
        self.sh(ns_b, "ip", "link", "set", if_b, "up")

    def address(self, ns: str, ifname: str, cidr: str) -> None:
        """Add ``cidr`` to ``ifname`` (an IPv6 one is usable at once: see :meth:`ns`)."""
        self.sh(ns, "ip", "addr", "add", cidr, "dev", ifname)

    def loss(self, ns: str, percent: int) -> None:
        """Drop ``percent`` % of the IP packets on ``ns``'s WAN link, both directions
        (once per ``ns``: a second call adds a second drop).

        nft ``numgen random`` on the netdev ingress hook at each end of the link,
        so the sender's NAT has already mapped a packet that the wire then loses.
        ARP is spared: losing it would only model a flaky first hop, not loss
        across the internet.
        """
        rule = f"meta protocol {{ ip, ip6 }} numgen random mod 100 < {percent} drop"
        for where, device in self._wan_link(ns):
            hook = f'type filter hook ingress device "{device}" priority 0'
            # a table per device: the WAN router holds one per lossy port, and a second
            # "chain c" of one shared table would hook every port into both drop rules
            # (36% for 20%, as each site's uplink had until 2026-12-03)
            self._table(where, f"netdev punchloss_{device}", hook, rule)

    def _wan_link(self, ns: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """``ns``'s WAN link as its two ends, each (namespace, device): ``wan0`` in
        ``ns``, and its port on the WAN router."""
        return (ns, "wan0"), (self.prefix + "wan", self.wan_ports[ns])

    def rate(self, ns: str, bits_per_second: int) -> None:
        """Shape ``ns``'s WAN link to ``bits_per_second`` each way, as an access
        line of that speed (a site's uplink, and the WAN router's port down to it).

        A token bucket (``tbf``, tc-tbf(8)) on the egress of each end: a burst of
        256 KiB (room for a 64 KiB GSO packet, and 2 ms at 1 Gbit/s) and at most
        20 ms of queue, beyond which the link drops, as a router's buffer does.

        Raises:
            ValueError: ``bits_per_second`` is not > 0.
            subprocess.CalledProcessError: ``tc`` refused (no ``sch_tbf`` here).
        """
        if bits_per_second <= 0:
            raise ValueError(f"a link rate is > 0 bit/s, not {bits_per_second}")
        for where, device in self._wan_link(ns):
            qdisc = ("root", "tbf", "rate", f"{bits_per_second}bit", "burst", "256kb")
            self.sh(where, "tc", "qdisc", "replace", "dev", device, *qdisc, "latency", "20ms")

    def block(self, ns: str, address: str) -> None:
        """Drop everything ``ns`` would forward to ``address`` (an IPv4 or IPv6 address
        or prefix) until :meth:`unblock`: a black hole, no ICMP error."""
        family = "ip6" if ":" in address else "ip"
        hook = "type filter hook forward priority -10"
        self._table(ns, f"{family} punchblock", hook, f"{family} daddr {address} drop")

    def _table(self, ns: str, table: str, hook: str, rule: str) -> None:
        """Load an nft table of one chain with one rule into ``ns``."""
        text = f"table {table} {{\n  chain c {{\n    {hook};\n    {rule}\n  }}\n}}\n"
        self.sh(ns, "nft", "-f", "-", stdin=text)

    def forward(self, ns: str, port: int, to_ip: str) -> None:
        """Port-forward TCP ``port`` on router ``ns``'s WAN address to ``to_ip``:``port``.

        A publicly reachable listener behind the NAT, on the very path a punch
        takes: the benchmarks' baseline for a direct connection.
        """
        self._table(
            ns,
            "ip punchforward",
            "type nat hook prerouting priority dstnat",
            f'iifname "wan0" tcp dport {port} dnat to {to_ip}:{port}',
        )
        self.sh(ns, "nft", "insert", "rule", "ip", "punchlab", "forward", "ct status dnat accept")

    def delay(self, seconds: float) -> None:
        """Hold every packet the WAN router forwards for ``seconds`` (one way, 0-1).

        The router's policy routing sends what it forwards through a TUN device
        that :mod:`netns.delay` serves, since this kernel has no ``netem``.
        Call after the topology is built; the delay line dies with the lab.
        """
        wan = self.prefix + "wan"
        self._delay_line("dly0", seconds)
        for family in ("-4", "-6"):
            self.sh(wan, "ip", family, "route", "add", "default", "dev", "dly0", "table", "100")
            rule = ("rule", "add", "not", "iif", "dly0", "table", "100", "priority", "100")
            self.sh(wan, "ip", family, *rule)

    def hold_back(
        self, source_ns: str, destination_ip: str, seconds: float, *, engaged: bool = True
    ) -> None:
        """Hold what the WAN router forwards from ``source_ns`` to ``destination_ip``
        for ``seconds`` (0-5) more, on top of any :meth:`delay`.

        With ``source_ns`` the rendezvous host, one peer gets its introduction
        (and every other control frame) late, as a peer on a slower path to the
        rendezvous does; its punch traffic is untouched. The server stays as
        it is in service: it sends both introductions at once.

        ``engaged`` False: the delay line is made, and holds nothing until
        :meth:`engage_hold` (so a peer may register at the path's own speed,
        then get its introduction late: the timing sweep).
        """
        wan = self.prefix + "wan"
        device = f"dly{len(self._helpers) + 1}"
        table = str(100 + len(self._helpers) + 1)
        self._delay_line(device, seconds)
        self.sh(wan, "ip", "route", "add", "default", "dev", device, "table", table)
        port = self.wan_ports[source_ns]
        rule = ("iif", port, "to", f"{destination_ip}/32", "table", table, "priority", "50")
        self._holds[source_ns, destination_ip] = rule
        if engaged:
            self.engage_hold(source_ns, destination_ip)

    def engage_hold(self, source_ns: str, destination_ip: str, engaged: bool = True) -> None:
        """Switch a :meth:`hold_back` on (or off; either, if it is so already, does
        nothing): packets forwarded from then on are held (or not); those already
        in the delay line come out in their time."""
        key = source_ns, destination_ip
        if (key in self._engaged) is engaged:
            return
        self.sh(self.prefix + "wan", "ip", "rule", "add" if engaged else "del", *self._holds[key])
        if engaged:
            self._engaged.add(key)
        else:
            self._engaged.discard(key)

    def _delay_line(self, device: str, seconds: float) -> None:
        """A TUN ``device`` on the WAN router that :mod:`netns.delay` serves."""
        wan = self.prefix + "wan"
        self.sh(wan, "ip", "tuntap", "add", "dev", device, "mode", "tun")
        helper = subprocess.Popen(
            [*self.exec_prefix(wan), sys.executable, str(DELAY_LINE), device, str(seconds)],
            stdout=subprocess.PIPE,
        )
        self._helpers.append(helper)
        assert helper.stdout is not None
        if helper.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the delay line did not start (exit {helper.wait()})")
        self.sh(wan, "ip", "link", "set", device, "up")
        for conf in ("all", "default", device):
            self.sh(wan, "sysctl", "-q", "-w", f"net.ipv4.conf.{conf}.rp_filter=0")

    def unblock(self, ns: str, family: str = "ip") -> None:
        """Undo :meth:`block` (``family`` ``"ip6"`` for an IPv6 one)."""
        self.sh(ns, "nft", "delete", "table", family, "punchblock")

    def nat(self, ns: str, profile: str, public_ip: str) -> None:
        """Make ``ns`` a router and load ``rulesets/<profile>.nft`` into it
        (:func:`render_ruleset`: its WAN address and port sequence filled in)."""
        self.sh(ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        # Where br_netfilter is loaded (Docker loads it), bridged LAN-to-LAN frames
        # would cross the router's IP firewall; a home router's switch does not do
        # that, so switch it off for this namespace when the knob exists.
        self.sh(
            ns,
            "sh",
            "-c",
            "f=/proc/sys/net/bridge/bridge-nf-call-iptables; [ ! -e $f ] || echo 0 > $f",
        )
        self.sh(ns, "nft", "-f", "-", stdin=render_ruleset(profile, public_ip))

    def firewall6(self, ns: str, profile: str) -> None:
        """Make ``ns`` an IPv6 router and load ``rulesets/<profile>.nft`` (``fw6-*``) into it."""
        self.sh(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        self.sh(ns, "nft", "-f", str(RULESETS / f"{profile}.nft"))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


@attrs.frozen
class Site:
    """One peer behind one NAT router (and, with IPv6, behind its IPv6 firewall)."""

    name: str
    peer_ns: str
    peer_ip: str | None
    """The peer's IPv4 address; None at an IPv6-only site."""
    nat_ns: str | None
    public_ip: str
    peer_ip6: str | None = None
    """The peer's global IPv6 address (no NAT: it is public); None without IPv6."""
    cross_ns: str | None = None
    """A second host on the peer's LAN (10.0.<site>.3), for cross traffic through
    the NAT (:func:`cross_traffic`); only where asked for."""


@attrs.frozen
class Topology:
    rendezvous_ns: str
    rendezvous_ip: str
    sites: tuple[Site, ...]
    rendezvous_ip6: str = RENDEZVOUS_IP6


PROFILES = (
    "public",
    "cone",
    "cone-rst",
    "cone-icmp",
    "cone-icmp-admin",
    "symmetric",
    "symmetric-seq",
)
"""Per-site NAT behaviours; ``public`` is a host on the WAN with no NAT."""
PROFILES6 = ("fw6-drop", "fw6-reject")
"""Per-site IPv6 firewalls (no NAT, RFC 6092): ``fw6-drop`` passes established and
related traffic only; ``fw6-reject`` also answers an unsolicited SYN with ICMPv6
administratively prohibited. A site profile is ``V4`` or ``V4+V6``
(``symmetric+fw6-drop``); ``none`` for V4 makes an IPv6-only peer (``none+fw6-drop``)."""


def split_profile(profile: str) -> tuple[str, str | None]:
    """``"cone+fw6-drop"`` -> ``("cone", "fw6-drop")``; ``"cone"`` -> ``("cone", None)``.

    Raises:
        ValueError: a part that is not in :data:`PROFILES` / :data:`PROFILES6`.
    """
    v4, _, v6 = profile.partition("+")
    if v4 not in (*PROFILES, "none") or (v6 and v6 not in PROFILES6) or (v4 == "none" and not v6):
        raise ValueError(
            f"profile must be V4 or V4+V6 with V4 in {PROFILES} (or none) and V6 in "
            f"{PROFILES6}, not {profile!r}"
        )
    return v4, v6 or None


WAN_ROUTER_IP = f"{WAN_PREFIX}.1"
"""The WAN router's address on every one of its links."""


def _wan(lab: Lab) -> tuple[str, Callable[[str, str], None]]:
    """The WAN router, and a function that attaches a namespace to it at an address.

    The WAN is one router with a point-to-point link per attached namespace, not
    one shared segment: as on the internet, two sites are at least a router hop
    apart, and the router's policy routing can send everything it forwards
    through one delay line (:meth:`Lab.delay`).
    """
    wan = lab.ns("wan")
    lab.sh(wan, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    lab.sh(wan, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    ports = iter(range(100))

    def attach(ns: str, ip: str) -> None:
        """Also at ``2001:db8::<last octet>``: every WAN host has both families."""
        port = f"p{next(ports)}"
        lab.wan_ports[ns] = port
        lab.link(wan, port, ns, "wan0")
        lab.address(wan, port, f"{WAN_ROUTER_IP}/32")
        lab.sh(wan, "ip", "route", "add", f"{ip}/32", "dev", port)
        lab.address(ns, "wan0", f"{ip}/32")
        route = ("ip", "route", "add", f"{WAN_PREFIX}.0/24", "via", WAN_ROUTER_IP)
        lab.sh(ns, *route, "dev", "wan0", "onlink")
        ip6 = wan6_ip(ip)
        lab.address(wan, port, f"{WAN6_ROUTER_IP}/128")
        lab.sh(wan, "ip", "-6", "route", "add", f"{ip6}/128", "dev", port)
        lab.address(ns, "wan0", f"{ip6}/128")
        route6 = ("ip", "-6", "route", "add", f"{WAN6_PREFIX}::/32", "via", WAN6_ROUTER_IP)
        lab.sh(ns, *route6, "dev", "wan0", "onlink")

    return wan, attach


WAN6_ROUTER_IP = f"{WAN6_PREFIX}::1"
"""The WAN router's IPv6 address on every one of its links."""


def wan6_ip(ip: str) -> str:
    """A WAN host's IPv6 address: ``203.0.113.11`` -> ``2001:db8::11``."""
    return f"{WAN6_PREFIX}::{ip.rsplit('.', 1)[1]}"


def _router(
    lab: Lab,
    attach: Callable[[str, str], None],
    name: str,
    profile: str,
    public_ip: str,
    lan: str,
    hosts: dict[str, int],
    profile6: str | None = None,
    ipv4: bool = True,
) -> dict[str, tuple[str, str | None, str | None]]:
    """A NAT router at ``public_ip`` whose LAN ``lan``.0/24 is a bridge ``lan0``.

    Args:
        hosts: host name -> last octet; each host gets its own namespace.
        profile6: an IPv6 firewall (:data:`PROFILES6`): the LAN is then also
            ``2001:db8:<third octet of lan>::/64``, routed by the WAN router to
            this router's IPv6 address, with no NAT.
        ipv4: False: the hosts get no IPv4 address or route (IPv6-only).

    Returns:
        host name -> (namespace, IPv4 LAN address or None, IPv6 address or None).
    """
    nat = lab.ns(f"nat-{name}")
    attach(nat, public_ip)
    lab.sh(nat, "ip", "link", "add", "lan0", "type", "bridge")
    lab.sh(nat, "ip", "link", "set", "lan0", "up")
    lab.address(nat, "lan0", f"{lan}.1/24")
    lan6 = f"{WAN6_PREFIX}:{lan.rsplit('.', 1)[1]}::" if profile6 else None
    if lan6 is not None:
        lab.address(nat, "lan0", f"{lan6}1/64")
        route = ("ip", "-6", "route", "add", f"{lan6}/64", "via", wan6_ip(public_ip))
        lab.sh(lab.prefix + "wan", *route, "dev", lab.wan_ports[nat])
    placed = {}
    for index, (host, octet) in enumerate(hosts.items()):
        ns = lab.ns(host)
        lab.link(nat, f"l{index}", ns, "eth0")
        lab.sh(nat, "ip", "link", "set", f"l{index}", "master", "lan0")
        ip = ip6 = None
        if ipv4:
            ip = f"{lan}.{octet}"
            lab.address(ns, "eth0", f"{ip}/24")
            lab.sh(ns, "ip", "route", "add", "default", "via", f"{lan}.1")
        if lan6 is not None:
            ip6 = f"{lan6}{octet}"
            lab.address(ns, "eth0", f"{ip6}/64")
            lab.sh(ns, "ip", "-6", "route", "add", "default", "via", f"{lan6}1")
        placed[host] = (ns, ip, ip6)
    lab.nat(nat, profile, public_ip)
    if profile6 is not None:
        lab.firewall6(nat, profile6)
    return placed


def _site(
    lab: Lab,
    attach: Callable[[str, str], None],
    name: str,
    profile: str,
    index: int,
    cross: bool = False,
) -> Site:
    v4, v6 = split_profile(profile)
    if v4 == "public":
        if v6 is not None:
            raise ValueError("a public site has no firewall: profile 'public' takes no +V6")
        peer = lab.ns(f"peer-{name}")
        ip = f"{WAN_PREFIX}.{20 + index}"
        attach(peer, ip)
        return Site(name, peer, ip, None, ip, wan6_ip(ip))
    public_ip = f"{WAN_PREFIX}.{10 + index}"
    nat_profile = "cone" if v4 == "none" else v4  # an IPv6-only LAN: nothing crosses it
    host, other = f"peer-{name}", f"cross-{name}"
    hosts = {host: 2, other: 3} if cross else {host: 2}
    placed = _router(
        lab, attach, name, nat_profile, public_ip, f"10.0.{index}", hosts, v6, v4 != "none"
    )
    peer, ip, ip6 = placed[host]
    cross_ns = placed[other][0] if cross else None
    return Site(name, peer, ip, lab.prefix + f"nat-{name}", public_ip, ip6, cross_ns)


def _rendezvous(lab: Lab) -> tuple[str, Callable[[str, str], None]]:
    _, attach = _wan(lab)
    rendezvous = lab.ns("rdv")
    attach(rendezvous, RENDEZVOUS_IP)
    return rendezvous, attach


def build_two_nats(
    lab: Lab, profile_a: str = "cone", profile_b: str = "cone", cross: bool = False
) -> Topology:
    """A WAN router (203.0.113.1) with the rendezvous host and two sites, one peer at each.

    ::

        peer a 10.0.1.2 -- 10.0.1.1 nat-a 203.0.113.11 --+
                                                         WAN router -- 203.0.113.10 rendezvous
        peer b 10.0.2.2 -- 10.0.2.1 nat-b 203.0.113.12 --+

    A ``public`` site has no router: its peer sits on the WAN at 203.0.113.2x.
    Routers have no default route: packets for a private address of the other
    LAN die at the first router, as on the internet.

    ``cross``: each NAT'd site gets a second LAN host too (:attr:`Site.cross_ns`).

    A site profile with ``+fw6-*`` (:data:`PROFILES6`) gives its peer a global
    IPv6 address too, ``2001:db8:<1 or 2>::2``, behind that firewall; every WAN
    host (the rendezvous at ``2001:db8::10`` included) has both families.

    Raises:
        ValueError: a profile that :func:`split_profile` refuses.
    """
    for profile in (profile_a, profile_b):
        split_profile(profile)
    rendezvous, attach = _rendezvous(lab)
    sites = (
        _site(lab, attach, "a", profile_a, 1, cross and profile_a != "public"),
        _site(lab, attach, "b", profile_b, 2, cross and profile_b != "public"),
    )
    return Topology(rendezvous, RENDEZVOUS_IP, sites)


def _placed(name: str, placed: tuple[str, str | None, str | None], nat: str, public: str) -> Site:
    ns, ip, ip6 = placed
    return Site(name, ns, ip, nat, public, ip6)


def build_hairpin(lab: Lab) -> Topology:
    """Both peers behind one cone NAT, on one LAN (10.0.1.2 and 10.0.1.3).

    The direct path is the LAN itself, through the peers' host candidates.
    """
    rendezvous, attach = _rendezvous(lab)
    public_ip = f"{WAN_PREFIX}.11"
    hosts = _router(lab, attach, "ab", "cone", public_ip, "10.0.1", {"peer-a": 2, "peer-b": 3})
    nat = lab.prefix + "nat-ab"
    sites = tuple(_placed(name, hosts[f"peer-{name}"], nat, public_ip) for name in ("a", "b"))
    return Topology(rendezvous, RENDEZVOUS_IP, sites)


OVERLAP_PORT = 45000
"""Peer b's fixed local port in the overlap topology; the stray host holds it too."""


def build_overlap(lab: Lab) -> tuple[Topology, tuple[str, str]]:
    """Two cone NATs whose LANs are both 10.0.0.0/24; a stray host on A's LAN.

    Peer a is 10.0.0.2 behind nat-a; peer b is 10.0.0.3 behind nat-b; and on
    A's LAN a *different* host, also 10.0.0.3, runs its own punch peer on the
    very ip:port b advertises as its host candidate (10.0.0.3:45000).

    Returns:
        the topology, and the stray's (namespace, address).
    """
    rendezvous, attach = _rendezvous(lab)
    a_hosts = _router(
        lab, attach, "a", "cone", f"{WAN_PREFIX}.11", "10.0.0", {"peer-a": 2, "stray": 3}
    )
    b_hosts = _router(lab, attach, "b", "cone", f"{WAN_PREFIX}.12", "10.0.0", {"peer-b": 3})
    sites = (
        _placed("a", a_hosts["peer-a"], lab.prefix + "nat-a", f"{WAN_PREFIX}.11"),
        _placed("b", b_hosts["peer-b"], lab.prefix + "nat-b", f"{WAN_PREFIX}.12"),
    )
    stray_ns, stray_ip, _ = a_hosts["stray"]
    assert stray_ip is not None
    return Topology(rendezvous, RENDEZVOUS_IP, sites), (stray_ns, stray_ip)


SEQUENCE_START = 30000
SEQUENCE_LENGTH = 4000
"""``symmetric-seq`` gives ports 30000 to 33999 in turn, then starts again: about
150 trials of the matrix (a trial takes 10 to 30 ports) before a wrap. A 200-port
sequence wrapped in the middle of 2 trials of 120, whose reports then looked
random; real NATs wrap too, at the end of a range of thousands."""


def render_ruleset(profile: str, public_ip: str) -> str:
    """``rulesets/<profile>.nft`` with ``$PUBLIC`` (the router's WAN address),
    ``$SEQUENCE`` (a map from numgen's count to the port it stands for) and
    ``$LENGTH`` (its size, :data:`SEQUENCE_LENGTH`) filled in.

    A map, since nft 1.0.6 hands a bare numgen value to snat in host byte order,
    which snat reads as network order (``numgen inc mod N offset 30000`` stepped
    by 256, measured); a map's values are ports, in network order. And nft
    cannot take a map through ``-D`` (it aborts), hence the text.
    """
    text = (RULESETS / f"{profile}.nft").read_text()
    ports = ", ".join(f"{i} : {SEQUENCE_START + i}" for i in range(SEQUENCE_LENGTH))
    text = text.replace("$SEQUENCE", f"{{ {ports} }}").replace("$LENGTH", str(SEQUENCE_LENGTH))
    return text.replace("$PUBLIC", public_ip)


CROSS_PORT = 9
"""Where cross traffic goes: a closed port of the rendezvous host (an RST answers
each SYN); the NAT maps each SYN all the same."""


@contextlib.contextmanager
def cross_traffic(lab: Lab, ns: str, per_second: float, seconds: float) -> Iterator[None]:
    """While the block runs, ``ns`` opens a TCP connection to the rendezvous host
    every ``1 / per_second`` s, each a new mapping on its NAT (a second LAN host's
    own traffic, issue 16); at most ``per_second * seconds`` of them, and the
    sender stops by itself after ``seconds`` (the network rule), or at the
    block's end."""
    count = int(per_second * seconds)
    script = (
        "import socket, time\n"
        f"for _ in range({count}):\n"
        "    s = socket.socket()\n"
        "    s.settimeout(0.2)\n"
        f"    s.connect_ex(({RENDEZVOUS_IP!r}, {CROSS_PORT}))\n"
        "    s.close()\n"
        f"    time.sleep({1 / per_second!r})\n"
    )
    sender = subprocess.Popen([*lab.exec_prefix(ns), sys.executable, "-c", script])
    try:
        yield
    finally:
        sender.kill()
        sender.wait()
